"""Device and dtype names ('auto', 'cpu', 'cuda:1', 'float16', ...) resolved to torch objects,
and what a model worker knows about its device: its own CUDA stream (`on_stream`), and the
errors after which the device is of no more use to the process (`poisons_device`).

The names are defined once, in model/config.py (`Device`, `DType`); the service, the command
line and the benchmarks all resolve them here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import torch

TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> float16 on cuda, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


# Messages of CUDA errors that poison the context: every later call on the device fails too,
# so only a new process recovers (CUDA's "sticky" errors, and the library failures they cause).
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "misaligned address",
    "illegal instruction",
    "unspecified launch failure",
    "launch timed out",
    "uncorrectable ecc error",
    "hardware stack error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
)


def poisons_device(exc: BaseException) -> bool:
    """Whether `exc`, raised by a model call, leaves the CUDA context unusable.

    `torch.AcceleratorError` (a CUDA runtime error surfaced by PyTorch) always does, as does a
    message naming a sticky error; an out-of-memory error or a bad input does not (the next
    batch may succeed). The causes an exception was raised from are searched too.
    """
    accelerator_error = getattr(torch, "AcceleratorError", None)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if accelerator_error is not None and isinstance(current, accelerator_error):
            return True
        text = str(current).lower()
        if any(marker in text for marker in STICKY_CUDA_ERRORS):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Queue the block's CUDA work on `stream` and wait for that stream alone at the end.

    The model worker's own stream: the face detector's threads use the default stream, and
    their copies and `.cpu()` calls would otherwise wait behind the model's batch in flight.
    The wait is on this stream, not the device, for the same reason; it makes the block's
    results complete before another thread reads them. `None`: a plain block (CPU).
    """
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()
