"""Images between their stored form and the networks' ranges: uint8 pixels <-> float [0, 1]
tensors, and [0, 1] <-> [-1, 1].

The one place that converts; the pipeline, the video path, the command line, the restorer,
training and the benchmarks use it. `normalize`/`denormalize` take float tensors of any layout
(NCHW or NHWC); only the values change. Colour order is RGB throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def denormalize(images: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """[-1, 1] (a decoder's output, possibly beyond) -> [0, 1].

    `clamp=False` keeps values outside the range (and their gradients), for losses.
    """
    if not clamp:
        return images * 0.5 + 0.5
    return (images.clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1)


def pixels_to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """N (H, W, 3) uint8 RGB images (a sequence, or one (N, H, W, 3) array) -> (N, 3, H, W)
    float32 in [0, 1], contiguous. The sequence must not be empty (its size is unknown)."""
    array = images if isinstance(images, np.ndarray) else np.stack(images)  # (N, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def tensor_to_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] (clamped) or uint8 -> (N, H, W, 3) uint8 RGB, on the CPU.

    Float values are rounded to the nearest level, so `pixels_to_tensor`'s output comes back to
    the exact pixels it was made from.
    """
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().byte()
    return images.permute(0, 2, 3, 1).contiguous().numpy()
