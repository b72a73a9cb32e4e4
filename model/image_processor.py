"""Images between the pixel range [0, 1] and the networks' range [-1, 1].

The one place that normalises and denormalises; the restorer, training and the benchmarks use
it. Tensors are float, any layout (NCHW or NHWC); only the values change.
"""

from __future__ import annotations

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
