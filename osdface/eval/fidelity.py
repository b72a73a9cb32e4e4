"""PSNR and SSIM: pixel fidelity, no weight files.

Both on uint8 RGB images (H, W, 3), data range 255, as the face-restoration papers report them.
PSNR over all three channels; identical images would be infinite and are capped at PSNR_CAP_DB
so the value stays a number in JSON and CSV. SSIM is Wang et al. (2004): 11x11 Gaussian window,
sigma 1.5, K1 0.01, K2 0.03, per channel, averaged over the valid (unpadded) area and channels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PSNR_CAP_DB = 100.0
_SIGMA, _HALF = 1.5, 5  # 11x11 window: skimage's truncate of 3.5 sigma gives the same


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 (H, W, 3) RGB images; PSNR_CAP_DB when identical."""
    _same_shape(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 (H, W, 3) RGB images, channels averaged."""
    _same_shape(a, b)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def _ssim_channel(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(img: np.ndarray) -> np.ndarray:
        # Only the valid area is kept below, so the border mode never matters.
        return cv2.GaussianBlur(img, (2 * _HALF + 1, 2 * _HALF + 1), _SIGMA)

    mx, my = blur(x), blur(y)
    vx, vy = blur(x * x) - mx * mx, blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim_map[_HALF:-_HALF, _HALF:-_HALF].mean())


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"images must be (H, W, 3) of one size, got {a.shape} and {b.shape}")
