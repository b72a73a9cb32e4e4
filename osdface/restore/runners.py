"""The heavy half of `osdface restore`: load the model once, then one function per kind of input.

Imported only after every check passed (it imports torch). `RUNNERS` maps a kind of input
(osdface/restore/plan.py `KINDS`) to the function restoring such inputs; a new kind adds one
entry.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model.atomic import write_atomic
from model.errors import ImageTooLargeError
from model.image_processor import tensor_to_pixels
from model.media.batch import restore_faces
from model.media.codecs.formats import ImageLimits
from model.media.faces.detect import FaceDetector
from model.media.pipeline import (
    BackgroundStep,
    FaceRestorer,
    PreparedPhoto,
    finish_photo,
    make_background,
    prepare_photo,
    restore_prepared,
)
from model.runtime.load import image_limits, load_backgrounds, load_detector, load_restorer
from osdface.restore.config import RunConfig
from osdface.restore.plan import Job
from osdface.restore.reporting import Record, Reporter, face_json, failed

logger = logging.getLogger("osdface.restore")


@dataclass(frozen=True)
class Context:
    """What every input of one run shares: loaded once, read-only afterwards."""

    config: RunConfig
    restorer: FaceRestorer
    detector: FaceDetector | None
    limits: ImageLimits
    reporter: Reporter
    face_size: int  # the restorer's input side: aligned crops must have it
    backgrounds: Mapping[str, BackgroundStep] = field(default_factory=dict)


def load_context(config: RunConfig, reporter: Reporter) -> Context:
    """Load the restorer (and the detector unless --aligned, and the background network the
    options ask for, on the restorer's device and dtype) as the settings say."""
    settings = config.settings
    restorer = load_restorer(settings, merge_lora=config.merge_lora)
    detector = None if config.options.aligned else load_detector(settings, restorer.device)
    backgrounds = load_backgrounds(settings, config.backgrounds, restorer.device, restorer.dtype)
    return Context(
        config,
        restorer,
        detector,
        image_limits(settings),
        reporter,
        face_size=restorer.config.image_size,
        backgrounds=backgrounds,
    )


def restore_images(jobs: list[Job], ctx: Context) -> list[Record]:
    """Photos (or aligned crops) through the pipeline, each written atomically to its target.

    The faces of all `jobs` share model calls of at most `batch_size` faces. A file that cannot
    be read, decoded, restored (a model call that fails it alone) or written fails alone.
    """
    config = ctx.config
    records: dict[int, Record] = {}
    prepared: dict[int, PreparedPhoto] = {}
    for k, job in enumerate(jobs):
        try:
            options = replace(config.options, output_format=job.output_format)
            data = _read(job.source, ctx.limits.max_bytes)
            prepared[k] = prepare_photo(
                data, ctx.detector, options, ctx.limits, face_size=ctx.face_size
            )
        except Exception as exc:
            logger.debug("traceback for %s", job.name, exc_info=True)
            records[k] = failed(job, exc)
    counts = [int(p.crops.shape[0]) for p in prepared.values()]
    ctx.reporter.faces_found(sum(counts))
    photos = list(prepared.values())
    restored = restore_prepared(
        ctx.restorer, photos, batch_size=config.batch_size, seed=config.seed
    )
    for (k, photo), faces in zip(prepared.items(), restored, strict=True):
        try:
            if faces.error is not None:
                raise faces.error
            assert faces.faces is not None
            records[k] = _finish(jobs[k], photo, faces.faces, ctx)
        except Exception as exc:
            logger.debug("traceback for %s", jobs[k].name, exc_info=True)
            records[k] = failed(jobs[k], exc)
        ctx.reporter.faces_done(int(photo.crops.shape[0]))
    return [records[k] for k in range(len(jobs))]


def group_size(kind: str, ctx: Context) -> int:
    """Inputs restored in one go: a batch of aligned crops (one face each), else one photo."""
    return ctx.config.batch_size if kind == "image" and ctx.config.options.aligned else 1


def restore_videos(jobs: list[Job], ctx: Context) -> list[Record]:
    """Each video through model/media/video (its faces share restorer calls across frames).

    The output keeps the container; `restore_video` writes it atomically. Progress is per frame.
    """
    from tqdm import tqdm

    from model.media.video.restore import restore_video

    config = ctx.config
    assert ctx.detector is not None and config.video is not None  # checked by the CLI
    seed = config.seed
    options = config.video.options(
        batch_faces=config.batch_size,
        strength=config.options.strength,
        only_center_face=config.options.only_center_face,
        max_faces=config.settings.max_faces,
    )

    def restore_fn(crops: torch.Tensor) -> torch.Tensor:
        return restore_faces(ctx.restorer, crops, seed=seed).images  # video cuts its calls

    records = []
    for job in jobs:
        assert job.source is not None and job.target is not None  # videos never use stdio
        source, target = Path(job.source), Path(job.target)
        target.parent.mkdir(parents=True, exist_ok=True)
        hidden = ctx.reporter.quiet or not ctx.reporter.tty
        with tqdm(unit="frame", desc=source.name, disable=hidden, leave=False) as bar:

            def progress(p: Any, bar: Any = bar) -> None:
                bar.total = p.total
                bar.update(p.frames - bar.n)

            result = restore_video(
                source, target, ctx.detector, restore_fn, options, progress=progress
            )
        ctx.reporter.faces_found(result.faces)
        ctx.reporter.faces_done(result.faces)
        # A video's faces are counted, not listed: one list per frame would be the whole track.
        timings = {"video": result.seconds}
        record = Record(job.name, str(target), "restored", [], timings, frames=result.frames)
        records.append(replace(record, face_count=result.faces))
    return records


RUNNERS: dict[str, Callable[[list[Job], Context], list[Record]]] = {
    "image": restore_images,
    "video": restore_videos,
}


def _finish(job: Job, photo: PreparedPhoto, faces: torch.Tensor, ctx: Context) -> Record:
    result = finish_photo(photo, faces, make_background(photo, ctx.backgrounds))
    if job.target is None:
        sys.stdout.buffer.write(result.data)
        sys.stdout.buffer.flush()
    else:
        # Beside the result first: a result whose extras failed is not there to be skipped.
        if ctx.config.save_faces:
            _save_crops(Path(job.target), photo.crops, faces)
        if ctx.config.compare:
            _save_compare(Path(job.target), photo, faces, result.data, ctx.limits)
        write_atomic(Path(job.target), result.data)
    found = [face_json(f) for f in result.faces]
    output = str(job.target) if job.target is not None else "<stdout>"
    return Record(job.name, output, "restored", found, dict(result.timings))


def _read(source: Path | str | None, max_bytes: int) -> bytes:
    """The input's bytes; a file over the limit fails before it is read."""
    if source is None:
        return sys.stdin.buffer.read(max_bytes + 1)
    size = Path(source).stat().st_size
    if size > max_bytes:
        raise ImageTooLargeError(f"the file has {size} bytes, over the {max_bytes} limit")
    return Path(source).read_bytes()


def _save_crops(target: Path, crops: torch.Tensor, restored: torch.Tensor) -> None:
    """The face crops beside the target (`face_crop_pngs`), each written atomically."""
    for name, png in face_crop_pngs(target.stem, crops, restored):
        write_atomic(target.parent / name, png)


def _save_compare(
    target: Path, photo: PreparedPhoto, faces: torch.Tensor, data: bytes, limits: ImageLimits
) -> None:
    """`--compare`: input | restored, the whole photo and (whole photos) each face, as PNGs in
    compare/ beside the target, each written atomically."""
    from model.media.codecs.decode import decode_image

    # The result as written (encoded, upscaled), read back within the output's own limits.
    read_back = replace(limits, max_bytes=len(data), max_pixels=limits.max_output_pixels)
    restored = decode_image(data, read_back).rgb
    height, width = restored.shape[:2]
    before = cv2.resize(photo.image.rgb, (width, height), interpolation=cv2.INTER_LANCZOS4)
    pairs = [(f"compare/{target.stem}.png", before, restored)]
    if not photo.options.aligned:
        crops, out = tensor_to_pixels(photo.crops), tensor_to_pixels(faces)
        for k in range(len(crops)):
            pairs.append((f"compare/{target.stem}_face{k:02d}.png", crops[k], out[k]))
    for name, left, right in pairs:
        write_atomic(target.parent / name, _png(np.hstack([left, right]), name))


def _png(rgb: np.ndarray, name: str) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))  # BGR for OpenCV only
    if not ok:
        raise OSError(f"cannot encode {name}")
    return png.tobytes()


def face_crop_pngs(
    stem: str, crops: torch.Tensor, restored: torch.Tensor
) -> list[tuple[str, bytes]]:
    """(`faces/<stem>_<k>_aligned.png` or `..._restored.png`, PNG bytes) for each face.

    crops, restored: (F, 3, S, S) RGB, uint8 or float in [0, 1]. `--save-faces` writes these
    beside a result, locally and on Ray alike.
    """
    files = []
    pixels = {"aligned": tensor_to_pixels(crops), "restored": tensor_to_pixels(restored)}
    for k in range(crops.shape[0]):
        for kind, faces in pixels.items():
            bgr = faces[k][..., ::-1]  # BGR for OpenCV only
            ok, png = cv2.imencode(".png", bgr)
            if not ok:
                raise OSError(f"cannot encode face {k} of {stem}")
            files.append((f"faces/{stem}_{k:02d}_{kind}.png", png.tobytes()))
    return files
