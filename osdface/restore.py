"""`osdface restore`: faces in image files and folders, whole photos or aligned crops."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

from model.codecs.formats import FORMATS
from model.config import BACKGROUNDS, DetectorConfig, DetectorName, DType, LatentMode
from osdface import video
from osdface.paths import default_weights_dir

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif", ".avif")
INPUT_SUFFIXES = IMAGE_SUFFIXES + video.VIDEO_SUFFIXES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore faces in image files or folders")
    p.add_argument("inputs", nargs="+", help="image or video files, or folders (--ray: URIs too)")
    p.add_argument("-o", "--output", required=True, help="output folder (--ray: also a URI)")
    p.add_argument("--weights", type=Path, default=default_weights_dir())
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 512x512 crops")
    p.add_argument("--latent", choices=get_args(LatentMode), default="mode")
    p.add_argument("--seed", type=int, default=0, help="seed for --latent sample")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", choices=get_args(DType), default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="aligned crops per model call")
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA unmerged (slower)")
    p.add_argument("--detector", default=DetectorConfig.name, choices=get_args(DetectorName))
    p.add_argument("--only-center-face", action="store_true")
    p.add_argument("--max-faces", type=int, default=None)
    p.add_argument("--strength", type=float, default=1.0, help="1 = fully restored")
    p.add_argument("--upscale", type=int, default=None, help="1..4 (default: --background's)")
    p.add_argument(
        "--background",
        choices=BACKGROUNDS,
        default="none",
        help="background upscaler: Lanczos (none) or Real-ESRGAN (docs/background.md)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output format (default: png for --aligned, else the input's if writable, else png)",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG / lossy WebP quality")
    p.add_argument("--save-faces", action="store_true", help="also write aligned/restored crops")
    video.add_video_arguments(p)
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="restore on a Ray cluster (docs/scale-out.md): ADDRESS such as ray://head:10001, "
        "or none for RAY_ADDRESS or else a local cluster; write --ray=ADDRESS or put --ray last",
    )
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local --ray cluster")
    p.add_argument("--report", type=Path, default=None, help="--ray: one JSON line per input")
    p.add_argument("--overwrite", action="store_true", help="--ray: redo existing outputs")
    p.set_defaults(func=_restore)


def list_images(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in INPUT_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(item)
    return files


def _restore(args: argparse.Namespace) -> int:
    if args.ray is not None:
        from osdface.ray_restore import restore_from_args

        return restore_from_args(args)
    args.inputs, args.output = [Path(i) for i in args.inputs], Path(args.output)
    from model.device import resolve_device, resolve_dtype
    from model.restorer import OSDFaceRestorer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.aligned and args.background != "none":
        logger.error("--background needs whole photos, not --aligned crops")
        return 2
    files = list_images(args.inputs)
    videos = [f for f in files if video.is_video(f)]
    files = [f for f in files if not video.is_video(f)]
    if not files and not videos:
        logger.error("no images or videos found in %s", [str(p) for p in args.inputs])
        return 1
    if videos:
        video.video_options(args)  # bad video flags fail before the weights load
    restorer = OSDFaceRestorer.from_pretrained(
        args.weights, device, dtype, merge_lora=not args.no_merge, latent=args.latent
    )
    args.output.mkdir(parents=True, exist_ok=True)
    if args.aligned and files:
        restore_aligned(files, args.output, restorer, args.batch_size, args.latent, args.seed)
    elif files:
        restore_whole_photos(args, files, restorer, device)
    failed = video.restore_videos(args, videos, restorer, device) if videos else 0
    return 1 if failed else 0


def restore_aligned(
    files: list[Path], out_dir: Path, restorer, batch_size: int, latent: str, seed: int
) -> list[Path]:
    """Aligned 512 crops -> restored PNGs, `batch_size` crops per model call."""
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from model.errors import InvalidInputError

    size = restorer.config.image_size
    written: list[Path] = []
    with tqdm(total=len(files), unit="face", desc="restoring") as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            crops = []
            for path in chunk:
                with Image.open(path) as im:
                    rgb = np.array(im.convert("RGB"))  # (H, W, 3) uint8 RGB
                if rgb.shape[:2] != (size, size):
                    raise InvalidInputError(f"{path}: aligned input must be {size}x{size}")
                crops.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)
            restored = restorer(torch.stack(crops), latent=latent, seed=seed).images
            for path, face in zip(chunk, restored, strict=True):
                pixels = (face.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
                target = out_dir / f"{path.stem}.png"
                Image.fromarray(pixels).save(target)
                written.append(target)
            bar.update(len(chunk))
    return written


def restore_whole_photos(args: argparse.Namespace, files: list[Path], restorer, device) -> None:
    """Detect, align, restore and paste back every face of each photo (default limits)."""
    from model.background import BackgroundUpscaler
    from model.codecs.formats import ImageLimits
    from model.faces.detect import FaceDetector
    from model.pipeline import RestoreOptions, restore_files

    options = RestoreOptions(
        only_center_face=args.only_center_face,
        max_faces=args.max_faces,
        strength=args.strength,
        upscale=args.upscale,
        background=args.background,
        output_format=args.format,
        quality=args.quality,
    ).validated()
    detector = FaceDetector.from_config(args.weights, DetectorConfig(name=args.detector), device)
    names = [] if args.background == "none" else [args.background]
    device, dtype = restorer.device, restorer.dtype  # the background runs beside the restorer
    backgrounds = {
        n: BackgroundUpscaler.from_pretrained(args.weights, n, device, dtype) for n in names
    }
    written = restore_files(
        files,
        args.output,
        detector,
        restorer,
        options,
        ImageLimits(),
        save_faces=args.save_faces,
        batch_size=args.batch_size,
        seed=args.seed,
        backgrounds=backgrounds,
    )
    logger.info("%d images written to %s", len(written), args.output)
