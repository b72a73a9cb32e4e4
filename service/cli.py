"""`osdface` command line: weights, restore, serve, train."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

logger = logging.getLogger("osdface")

DTYPES = ("auto", "float32", "float16", "bfloat16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from model.errors import OSDFaceError

    try:
        return int(args.func(args) or 0)
    except OSDFaceError as e:
        logger.error("%s", e)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osdface", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(title="commands")
    _add_weights(sub)
    _add_restore(sub)
    for module in ("service.serve_cli", "train.cli"):
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


# --- weights ---------------------------------------------------------------------------------


def _add_weights(sub: argparse._SubParsersAction) -> None:
    weights = sub.add_parser("weights", help="fetch, convert, merge and verify model weights")
    wsub = weights.add_subparsers(title="weights commands")
    for name, func, text in (
        ("fetch", _weights_fetch, "download what is missing (resumable, checksummed)"),
        ("convert", _weights_convert, "released pickles -> safetensors, without running pickle"),
        ("merge", _weights_merge, "fuse the LoRA into the UNet and save it as safetensors"),
        ("verify", _weights_verify, "check every file's sha256 and load everything strictly"),
    ):
        p = wsub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=_default_weights_dir(), help="weights folder")
        p.set_defaults(func=func)
        if name == "fetch":
            p.add_argument("--sd-repo", help="a mirror of stabilityai/stable-diffusion-2-1-base")
            p.add_argument("--all", action="store_true", help="also optional files")
            p.add_argument("--train", action="store_true", help="also the training loss networks")


def _default_weights_dir() -> Path:
    import os

    return Path(os.environ.get("OSDFACE_WEIGHTS_DIR", "./osdface-weights"))


def _weights_fetch(args: argparse.Namespace) -> int:
    from weights.fetch import fetch

    fetched = fetch(
        args.dir, include_optional=args.all, include_train=args.train, sd_repo=args.sd_repo
    )
    logger.info("%d files fetched into %s", len(fetched), args.dir)
    return 0


def _weights_convert(args: argparse.Namespace) -> int:
    from model.config import OSDFaceConfig
    from model.weights import WeightsLayout, convert_released

    layout = WeightsLayout(args.dir)
    convert_released(layout, OSDFaceConfig.load(layout.osdface))
    return 0


def _weights_merge(args: argparse.Namespace) -> int:
    from model.config import OSDFaceConfig
    from model.weights import WeightsLayout, write_merged_unet

    layout = WeightsLayout(args.dir)
    write_merged_unet(layout, OSDFaceConfig.load(layout.osdface))
    return 0


def _weights_verify(args: argparse.Namespace) -> int:
    from model.restorer import OSDFaceRestorer
    from weights.fetch import verify

    for path, digest in verify(args.dir).items():
        print(f"{digest}  {path}")  # noqa: T201 - the command's output
    OSDFaceRestorer.from_pretrained(args.dir)
    logger.info("all weights load strictly")
    return 0


# --- restore ---------------------------------------------------------------------------------


def _add_restore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore faces in image files or folders")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--weights", type=Path, default=_default_weights_dir())
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 512x512 crops")
    p.add_argument("--latent", choices=("mode", "sample"), default="mode")
    p.add_argument("--seed", type=int, default=0, help="seed for --latent sample")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="aligned crops per model call")
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA unmerged (slower)")
    p.add_argument(
        "--detector",
        default="retinaface_resnet50",
        choices=("retinaface_resnet50", "retinaface_mobile0.25"),
    )
    p.add_argument("--only-center-face", action="store_true")
    p.add_argument("--max-faces", type=int, default=None)
    p.add_argument("--strength", type=float, default=1.0, help="1 = fully restored")
    p.add_argument("--upscale", type=int, default=1, help="1..4, background Lanczos-upscaled")
    p.add_argument(
        "--format",
        choices=("png", "jpeg", "webp"),
        default=None,
        help="output format (default: png for --aligned, else the input's)",
    )
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--save-faces", action="store_true", help="also write aligned/restored crops")
    p.set_defaults(func=_restore)


def list_images(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(item)
    return files


def _restore(args: argparse.Namespace) -> int:
    from model.restorer import OSDFaceRestorer
    from service.state import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    files = list_images(args.inputs)
    if not files:
        logger.error("no images found in %s", [str(p) for p in args.inputs])
        return 1
    restorer = OSDFaceRestorer.from_pretrained(
        args.weights, device, dtype, merge_lora=not args.no_merge, latent=args.latent
    )
    args.output.mkdir(parents=True, exist_ok=True)
    if args.aligned:
        restore_aligned(files, args.output, restorer, args.batch_size, args.latent, args.seed)
    else:
        restore_whole_photos(args, files, restorer, device)
    return 0


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
    """Detect, align, restore and paste back every face of each photo (limits from settings)."""
    from model.pipeline import RestoreOptions, restore_files
    from service.settings import Settings
    from service.state import image_limits, load_detector

    options = RestoreOptions(
        only_center_face=args.only_center_face,
        max_faces=args.max_faces,
        strength=args.strength,
        upscale=args.upscale,
        output_format=args.format,
        quality=args.quality,
    ).validated()
    settings = Settings(weights_dir=args.weights, detector=args.detector)
    detector = load_detector(settings, device)
    limits = image_limits(settings)
    written = restore_files(
        files,
        args.output,
        detector,
        restorer,
        options,
        limits,
        save_faces=args.save_faces,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    logger.info("%d images written to %s", len(written), args.output)


if __name__ == "__main__":
    sys.exit(main())
