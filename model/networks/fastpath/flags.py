"""Process-wide backend flags the fast path sets for a span of work, then puts back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cudnn_autotuning(enabled: bool) -> Iterator[None]:
    """cuDNN times its algorithms for each new shape inside the block; the flag is restored after.

    Only the restorer's warm-up and graph captures autotune: cuDNN keeps each tuned shape's
    choice after the flag goes off, and the restorer's shapes are fixed. Left on for the whole
    process, the face detector (another input shape with nearly every photo, in the service's
    CPU threads) would time every convolution again for each photo. The flag is global, so
    convolutions other threads launch inside the block autotune too; the service warms up before
    it takes traffic. A no-op when `enabled` is False.
    """
    if not enabled:
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
