"""The heavy half of `osdface restore`: load the model once, then one function per kind of input.

Imported only after every check passed (it imports torch). `RUNNERS` maps a kind of input
(osdface/restore/plan.py `KINDS`) to the function restoring one such input; a new kind adds one entry.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import torch

from model.networks.background import BackgroundUpscaler
from model.media.codecs.formats import ImageLimits
from model.device import resolve_device, resolve_dtype
from model.errors import ImageTooLargeError
from model.media.faces.detect import FaceDetector
from model.media.pipeline import (
    BackgroundStep,
    FaceRestorer,
    PreparedPhoto,
    RestoreOptions,
    finish_photo,
    make_background,
    prepare_photo,
    restore_crops,
)
from model.networks.restorer import OSDFaceRestorer
from model.atomic import write_atomic
from osdface.restore.plan import Job
from osdface.restore.reporting import Record, Reporter, face_json, failed
from service.settings import Settings
from service.state import fast_path_config, image_limits, load_detector

logger = logging.getLogger("osdface.restore")


@dataclass(frozen=True)
class Context:
    """What every input of one run shares: loaded once, read-only afterwards."""

    restorer: FaceRestorer
    detector: FaceDetector | None
    options: RestoreOptions
    limits: ImageLimits
    batch_size: int
    seed: int | None
    save_faces: bool
    reporter: Reporter
    face_size: int  # the restorer's input side: aligned crops must have it
    backgrounds: Mapping[str, BackgroundStep] = field(default_factory=dict)
    video_options: Any = None  # model.media.video VideoOptions, when the run has videos


def load_context(
    settings: Settings, options: RestoreOptions, args: argparse.Namespace, reporter: Reporter
) -> Context:
    """Load the restorer (and the detector unless --aligned) as the settings say."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    logger.info("loading the restorer from %s on %s (%s)", settings.weights_dir, device, dtype)
    restorer = OSDFaceRestorer.from_pretrained(
        settings.weights_dir,
        device,
        dtype,
        merge_lora=not args.no_merge,
        latent=settings.latent,
        fast=fast_path_config(settings),
    )
    detector = None if args.aligned else load_detector(settings, device)
    backgrounds = load_backgrounds(settings.weights_dir, options, restorer)
    return Context(
        restorer,
        detector,
        options,
        image_limits(settings),
        batch_size=settings.max_batch_faces,
        seed=settings.seed if settings.latent == "sample" else None,
        save_faces=args.save_faces,
        reporter=reporter,
        face_size=restorer.config.image_size,
        backgrounds=backgrounds,
        video_options=getattr(args, "video_options", None),
    )


def load_backgrounds(
    weights_dir: Path, options: RestoreOptions, restorer: OSDFaceRestorer
) -> dict[str, BackgroundStep]:
    """The background network `options` asks for ({} for "none"): on the restorer's device, in
    its precision, so the two share the accelerator."""
    names = [] if options.background == "none" else [options.background]
    return {
        name: BackgroundUpscaler.from_pretrained(weights_dir, name, restorer.device, restorer.dtype)
        for name in names
    }


def restore_images(jobs: list[Job], ctx: Context) -> list[Record]:
    """Photos (or aligned crops) through the pipeline, each written atomically to its target.

    The faces of all `jobs` share model calls of at most `batch_size` faces. A file that cannot
    be read, decoded or written fails alone; an error of the model call itself is raised (the
    caller then retries each job alone).
    """
    records: dict[int, Record] = {}
    prepared: dict[int, PreparedPhoto] = {}
    for k, job in enumerate(jobs):
        try:
            options = replace(ctx.options, output_format=job.output_format)
            data = _read(job.source, ctx.limits.max_bytes)
            prepared[k] = prepare_photo(
                data, ctx.detector, options, ctx.limits, face_size=ctx.face_size
            )
        except Exception as exc:
            logger.debug("traceback for %s", job.name, exc_info=True)
            records[k] = failed(job, exc)
    counts = [int(p.crops.shape[0]) for p in prepared.values()]
    ctx.reporter.faces_found(sum(counts))
    restored = _restore_together(list(prepared.values()), ctx)
    for (k, photo), faces in zip(prepared.items(), restored, strict=True):
        try:
            records[k] = _finish(jobs[k], photo, faces, ctx)
        except Exception as exc:
            logger.debug("traceback for %s", jobs[k].name, exc_info=True)
            records[k] = failed(jobs[k], exc)
        ctx.reporter.faces_done(int(faces.shape[0]))
    return [records[k] for k in range(len(jobs))]


def group_size(kind: str, ctx: Context) -> int:
    """Inputs restored in one go: a batch of aligned crops (one face each), else one photo."""
    return ctx.batch_size if kind == "image" and ctx.options.aligned else 1


def restore_videos(jobs: list[Job], ctx: Context) -> list[Record]:
    """Each video through model/media/video (its faces share restorer calls across frames).

    The output keeps the container; `restore_video` writes it atomically. Progress is per frame.
    """
    from tqdm import tqdm

    from model.media.video.restore import restore_video

    assert ctx.detector is not None and ctx.video_options is not None  # checked by the CLI
    extra = {} if ctx.seed is None else {"seed": ctx.seed}

    def restore_fn(crops: torch.Tensor) -> torch.Tensor:
        return ctx.restorer(crops, **extra).images

    records = []
    for job in jobs:
        assert job.source is not None and job.target is not None  # videos never use stdio
        job.target.parent.mkdir(parents=True, exist_ok=True)
        hidden = ctx.reporter.quiet or not ctx.reporter.tty
        with tqdm(unit="frame", desc=job.source.name, disable=hidden, leave=False) as bar:

            def progress(p: Any, bar: Any = bar) -> None:
                bar.total = p.total
                bar.update(p.frames - bar.n)

            result = restore_video(
                job.source,
                job.target,
                ctx.detector,
                restore_fn,
                ctx.video_options,
                progress=progress,
            )
        logger.info(
            "%s: frames %d, faces %d, %.2f frames/s",
            job.name,
            result.frames,
            result.faces,
            result.frames / max(result.seconds, 1e-9),
        )
        # The report's face list is per photo; a video's faces are counted in the line above.
        records.append(Record(job.name, str(job.target), "restored", [], {"video": result.seconds}))
    return records


RUNNERS: dict[str, Callable[[list[Job], Context], list[Record]]] = {
    "image": restore_images,
    "video": restore_videos,
}


def _restore_together(photos: list[PreparedPhoto], ctx: Context) -> list[torch.Tensor]:
    """Every photo's faces, (F_i, 3, 512, 512), from calls of at most `batch_size` faces."""
    if len(photos) == 1:
        return [restore_crops(ctx.restorer, photos[0], batch_size=ctx.batch_size, seed=ctx.seed)]
    crops = torch.cat([p.crops for p in photos]) if photos else torch.zeros(0)
    if crops.shape[0] == 0:
        return [p.crops for p in photos]
    extra = {} if ctx.seed is None else {"seed": ctx.seed}
    step = ctx.batch_size
    start = time.perf_counter()
    out = torch.cat(
        [ctx.restorer(crops[i : i + step], **extra).images for i in range(0, len(crops), step)]
    )
    share = (time.perf_counter() - start) / len(crops)
    parts = list(torch.split(out, [int(p.crops.shape[0]) for p in photos]))
    for photo, part in zip(photos, parts, strict=True):
        photo.timings["restore"] = share * int(part.shape[0])  # its share of the shared calls
    return parts


def _finish(job: Job, photo: PreparedPhoto, faces: torch.Tensor, ctx: Context) -> Record:
    result = finish_photo(photo, faces, make_background(photo, ctx.backgrounds))
    if job.target is None:
        sys.stdout.buffer.write(result.data)
        sys.stdout.buffer.flush()
    else:
        write_atomic(job.target, result.data)
        if ctx.save_faces:
            _save_crops(job.target, photo.crops, faces)
    found = [face_json(f) for f in result.faces]
    output = str(job.target) if job.target is not None else "<stdout>"
    return Record(job.name, output, "restored", found, dict(result.timings))


def _read(source: Path | None, max_bytes: int) -> bytes:
    """The input's bytes; a file over the limit fails before it is read."""
    if source is None:
        return sys.stdin.buffer.read(max_bytes + 1)
    size = source.stat().st_size
    if size > max_bytes:
        raise ImageTooLargeError(f"the file has {size} bytes, over the {max_bytes} limit")
    return source.read_bytes()


def _save_crops(target: Path, crops: torch.Tensor, restored: torch.Tensor) -> None:
    """The face crops beside the target (`face_crop_pngs`), each written atomically."""
    for name, png in face_crop_pngs(target.stem, crops, restored):
        write_atomic(target.parent / name, png)


def face_crop_pngs(
    stem: str, crops: torch.Tensor, restored: torch.Tensor
) -> list[tuple[str, bytes]]:
    """(`faces/<stem>_<k>_aligned.png` or `..._restored.png`, PNG bytes) for each face.

    crops, restored: (F, 3, S, S) RGB, uint8 or float in [0, 1]. `--save-faces` writes these
    beside a result, locally and on Ray alike.
    """
    files = []
    for k in range(crops.shape[0]):
        for kind, batch in (("aligned", crops), ("restored", restored)):
            face = batch[k].detach().cpu()
            if face.dtype != torch.uint8:
                face = (face.float().clamp(0, 1) * 255).round().byte()
            bgr = face.permute(1, 2, 0).numpy()[..., ::-1]  # BGR for OpenCV only
            ok, png = cv2.imencode(".png", bgr)
            if not ok:
                raise OSError(f"cannot encode face {k} of {stem}")
            files.append((f"faces/{stem}_{k:02d}_{kind}.png", png.tobytes()))
    return files
