"""Alignment of a face to the FFHQ 512 template through its five landmarks.

Conventions: images are (H, W, 3) uint8 RGB. Points are (x, y) in pixels. An "affine" is a
(2, 3) float64 matrix mapping image coordinates to aligned-crop coordinates (OpenCV's convention:
pixel i has coordinate i).
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np

from model.config import OSDFaceConfig
from model.errors import InvalidInputError

# The restorer's input side: aligned crops are made at the size the model was trained on.
FACE_SIZE: Final[int] = OSDFaceConfig.image_size

# Five points (left eye, right eye, nose tip, left and right mouth corners; "left" is the image's
# left) of an FFHQ-aligned 512x512 face, in crop pixels. This is the standard template of
# facexlib's FaceRestoreHelper and GFPGAN (their 512 template), itself derived from the FFHQ
# alignment; OSDFace was trained on FFHQ crops, so its input must be aligned to it.
FFHQ_TEMPLATE_512: Final[np.ndarray] = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
# The template is defined for 512 pixels; scaled to the face size (exactly itself at 512).
FFHQ_TEMPLATE: Final[np.ndarray] = FFHQ_TEMPLATE_512 * (FACE_SIZE / 512)


def check_rgb(rgb: np.ndarray) -> None:
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.dtype != np.uint8
        or rgb.ndim != 3
        or rgb.shape[2] != 3
    ):
        shape = getattr(rgb, "shape", None)
        raise InvalidInputError(f"expected an (H, W, 3) uint8 RGB array, got {shape}")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama's closed form (no reflection). src, dst: (N, 2) points, N >= 2. Returns (2, 3).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    covariance = dst_c.T @ src_c / len(src)  # (2, 2)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    variance = (src_c**2).sum() / len(src)
    if variance <= 0:
        raise InvalidInputError("landmarks are all at one point")
    scale = float(np.trace(np.diag(singular) @ sign)) / variance
    translation = mean_dst - scale * rotation @ mean_src
    return np.hstack([scale * rotation, translation[:, None]])


# Outside the photo the crop continues the border's pixels (no mirror: a reflected half-face
# would show the restorer a third eye), blurred more and faded toward the photo's mean colour
# the further out it goes, in crop pixels.
_FILL_BLUR_SIGMA: Final[float] = 12.0
_FILL_BLUR_DISTANCE: Final[float] = 24.0  # fully blurred this far from the photo
_FILL_FADE_DISTANCE: Final[float] = 96.0  # fully the mean colour this far from the photo


def align_face(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp the face with these (5, 2) landmarks onto the FFHQ template.

    Returns the crop, (FACE_SIZE, FACE_SIZE, 3) uint8 RGB, and the (2, 3) image -> crop affine.
    Parts of the crop outside the photo are filled with a blurred, faded continuation of its
    border (see `fill_outside`); they are never pasted back.
    """
    check_rgb(rgb)
    affine = similarity_transform(landmarks, FFHQ_TEMPLATE)
    size = (FACE_SIZE, FACE_SIZE)
    crop = cv2.warpAffine(rgb, affine, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpAffine(
        np.ones(rgb.shape[:2], np.uint8),
        affine,
        size,
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    if inside.all():
        return crop, affine
    return fill_outside(crop, inside.astype(bool)), affine


def fill_outside(crop: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Blend the crop's pixels outside the photo toward a blur, then the mean colour, by distance.

    crop: (S, S, 3) uint8 RGB warped with replicated borders; inside: (S, S) bool, True
    where the crop shows the photo. Pixels inside are returned unchanged.
    """
    if not inside.any():
        return crop
    distance = cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, 5)  # (512, 512)
    pixels = crop.astype(np.float32)
    blurred = cv2.GaussianBlur(pixels, (0, 0), _FILL_BLUR_SIGMA)
    mean = pixels[inside].mean(axis=0)  # (3,) the photo's part of the crop
    to_blur = np.clip(distance / _FILL_BLUR_DISTANCE, 0.0, 1.0)[..., None]
    to_mean = np.clip(distance / _FILL_FADE_DISTANCE, 0.0, 1.0)[..., None]
    filled = pixels + to_blur * (blurred - pixels)
    filled = filled + to_mean * (mean - filled)
    out = np.where(inside[..., None], pixels, filled)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
