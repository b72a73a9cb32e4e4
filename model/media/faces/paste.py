"""Paste-back: restored aligned crops warped back into the photo through a feathered mask.

Conventions: canvases are (H, W, 3) uint8 RGB; faces are (512, 512, 3) float32 RGB in [0, 1];
an "affine" is the (2, 3) photo -> crop transform from `model.media.faces.align.align_face`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

import cv2
import numpy as np

from model.errors import InvalidInputError
from model.media.faces.align import FACE_SIZE

# Soft mask in crop space: 1 inside, 0 in a border band, blurred in between. Because the crop is
# a fixed 512 square scaled onto the face, the feather is proportional to the face's size in the
# photo. The blur radius (4 sigma) stays inside the band, so the mask is exactly 0 on the crop's
# edge and no crop border (or beyond) ever reaches the photo.
_MASK_BAND: Final[int] = 48
_MASK_SIGMA: Final[float] = 10.0


@functools.cache
def paste_mask() -> np.ndarray:
    """(512, 512) float32 in [0, 1]: the eroded, blurred paste mask in crop coordinates."""
    mask = np.zeros((FACE_SIZE, FACE_SIZE), np.float32)
    mask[_MASK_BAND:-_MASK_BAND, _MASK_BAND:-_MASK_BAND] = 1.0  # erosion of the full crop
    radius = int(4 * _MASK_SIGMA)
    blurred = cv2.GaussianBlur(mask, (2 * radius + 1, 2 * radius + 1), _MASK_SIGMA)
    blurred.flags.writeable = False
    return blurred


def canvas_to_crop(affine: np.ndarray, scale: int, x0: int = 0, y0: int = 0) -> np.ndarray:
    """(2, 3) map from pixels of a canvas `scale` times the photo (offset x0, y0) to the crop.

    A canvas pixel X is the photo position (X + 0.5) / scale - 0.5 (pixel centres line up, as
    in OpenCV's resize), which `affine` then takes into the crop.
    """
    s = 1.0 / scale
    to_photo = np.array(
        [[s, 0.0, (x0 + 0.5) * s - 0.5], [0.0, s, (y0 + 0.5) * s - 0.5], [0.0, 0.0, 1.0]]
    )
    return np.asarray(affine, np.float64) @ to_photo


def paste_faces(
    canvas: np.ndarray,
    faces: Sequence[np.ndarray],
    affines: Sequence[np.ndarray],
    *,
    scale: int = 1,
    strength: float = 1.0,
    feather: bool = True,
) -> np.ndarray:
    """Paste restored crops back into `canvas` through their inverse transforms.

    canvas: (H', W', 3) uint8 RGB, the photo or its `scale`-times upscaled copy (modified in
    place and returned). faces: (512, 512, 3) float32 RGB in [0, 1], pasted in order, each over
    the result of the previous ones, so overlapping faces blend into each other without seams.
    affines: the photo -> crop transforms from `align_face`. strength: blend weight of the
    restored face against what is under it (0 leaves the canvas exactly as it was).
    `feather=False` pastes the whole crop with no mask (input that was an aligned crop).
    """
    if len(faces) != len(affines):
        raise InvalidInputError(f"{len(faces)} faces for {len(affines)} transforms")
    for face, affine in zip(faces, affines, strict=True):
        _paste_one(canvas, face, affine, scale, strength, feather)
    return canvas


def _paste_one(
    canvas: np.ndarray,
    face: np.ndarray,
    affine: np.ndarray,
    scale: int,
    strength: float,
    feather: bool,
) -> None:
    roi = _footprint(affine, scale, canvas.shape[1], canvas.shape[0])
    if roi is None:
        return
    x0, y0, x1, y1 = roi
    to_crop = canvas_to_crop(affine, scale, x0, y0)
    size = (x1 - x0, y1 - y0)
    inverse = cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(
        np.asarray(face, np.float32) * 255.0,
        to_crop,
        size,
        flags=cv2.INTER_CUBIC | inverse,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if feather:
        weight = cv2.warpAffine(
            paste_mask(),
            to_crop,
            size,
            flags=cv2.INTER_LINEAR | inverse,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.0,
        )[..., None]
    else:
        weight = np.ones((size[1], size[0], 1), np.float32)
    under = canvas[y0:y1, x0:x1].astype(np.float32)
    blended = under + (strength * weight) * (warped - under)
    canvas[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _footprint(
    affine: np.ndarray, scale: int, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Canvas box (x0, y0, x1, y1), end-exclusive, covering the crop; None when off-canvas."""
    to_canvas = cv2.invertAffineTransform(canvas_to_crop(affine, scale))
    edge = FACE_SIZE - 0.5
    corners = np.array([[-0.5, -0.5, 1], [edge, -0.5, 1], [-0.5, edge, 1], [edge, edge, 1]])
    points = corners @ to_canvas.T  # (4, 2)
    x0, y0 = np.floor(points.min(0)).astype(int)
    x1, y1 = np.ceil(points.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return int(x0), int(y0), int(x1), int(y1)
