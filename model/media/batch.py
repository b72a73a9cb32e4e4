"""The faces of many photos through the restorer: calls of at most `batch_size` faces, each
photo's share of the time, and, when a shared call fails, each photo alone.

Every front end restores faces through here: `restore_photo` (one photo), `osdface restore`
(model/media/pipeline.py's photos, several per call) and its Ray stage (photos from several
workers), and the service's model worker (`restore_faces`: the batcher cuts its own calls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

logger = logging.getLogger(__name__)


class _RestoredBatch(Protocol):
    images: torch.Tensor


class FaceRestorer(Protocol):
    """What the pipeline needs of a restorer (OSDFaceRestorer is one).

    images: (B, 3, 512, 512) float32 in [0, 1], RGB -> `.images` of the same shape and range,
    and optionally `.timings` (seconds by stage). `seed` is passed only when the caller sets one
    (it matters for a sampled VAE latent).
    """

    def __call__(self, images: torch.Tensor, *, seed: int | None = None) -> _RestoredBatch: ...


class RestoredFaces(NamedTuple):
    """images: (N, 3, S, S) float in [0, 1] RGB; timings: seconds by model stage, summed."""

    images: torch.Tensor
    timings: dict[str, float]


@dataclass
class PhotoFaces:
    """One photo's faces after `restore_photos`: restored, or the error that failed them.

    faces: (F, 3, S, S) float in [0, 1] RGB (F may be 0), None when `error` is set; seconds:
    the photo's share of the model calls' time (its faces' part of calls shared with others).
    """

    faces: torch.Tensor | None
    seconds: float = 0.0
    error: Exception | None = None


def restore_faces(
    restorer: FaceRestorer,
    crops: torch.Tensor,
    *,
    batch_size: int | None = None,
    seed: int | None = None,
) -> RestoredFaces:
    """crops (N, 3, S, S) float32 in [0, 1] RGB, in calls of at most `batch_size` faces (None:
    one call) -> the restored faces, same shape and range, and the calls' stage timings."""
    if crops.shape[0] == 0:
        return RestoredFaces(crops, {})
    step = batch_size or crops.shape[0]
    extra = {} if seed is None else {"seed": seed}
    parts: list[torch.Tensor] = []
    timings: dict[str, float] = {}
    for start in range(0, crops.shape[0], step):
        out = restorer(crops[start : start + step], **extra)
        parts.append(out.images)
        for stage, seconds in getattr(out, "timings", {}).items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    return RestoredFaces(parts[0] if len(parts) == 1 else torch.cat(parts), timings)


def restore_photos(
    restorer: FaceRestorer,
    crops: Sequence[torch.Tensor],
    *,
    batch_size: int | None = None,
    seed: int | None = None,
) -> list[PhotoFaces]:
    """Each photo's crops, (F_i, 3, S, S) float32 in [0, 1] RGB, restored in shared calls of at
    most `batch_size` faces; one result per photo, in order.

    When the shared calls fail, each photo with faces is retried alone: a photo that still
    fails gets its error, and the others are restored.
    """
    try:
        return _together(restorer, crops, batch_size, seed)
    except Exception as exc:
        if sum(1 for c in crops if c.shape[0]) <= 1:  # it was alone: no second try
            return [PhotoFaces(None, error=exc) if c.shape[0] else PhotoFaces(c) for c in crops]
        logger.debug("a model call of %d photos failed; each alone", len(crops), exc_info=exc)
        return [_alone(restorer, c, batch_size, seed) for c in crops]


def _together(
    restorer: FaceRestorer, crops: Sequence[torch.Tensor], batch_size: int | None, seed: int | None
) -> list[PhotoFaces]:
    counts = [int(c.shape[0]) for c in crops]
    if sum(counts) == 0:
        return [PhotoFaces(c) for c in crops]
    together = crops[0] if len(crops) == 1 else torch.cat([c for c in crops if c.shape[0]])
    start = time.perf_counter()
    restored = restore_faces(restorer, together, batch_size=batch_size, seed=seed).images
    share = (time.perf_counter() - start) / sum(counts)
    parts = torch.split(restored, counts)
    return [PhotoFaces(part, share * n) for part, n in zip(parts, counts, strict=True)]


def _alone(
    restorer: FaceRestorer, crops: torch.Tensor, batch_size: int | None, seed: int | None
) -> PhotoFaces:
    try:
        return _together(restorer, [crops], batch_size, seed)[0]
    except Exception as exc:
        return PhotoFaces(None, error=exc)
