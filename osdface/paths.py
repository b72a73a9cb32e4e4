"""Defaults the command groups share."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def default_weights_dir() -> Path:
    """OSDFACE_WEIGHTS_DIR, else ./osdface-weights."""
    return Path(os.environ.get("OSDFACE_WEIGHTS_DIR", "./osdface-weights"))


def write_atomic(target: Path, data: bytes) -> None:
    """Write `data` to a hidden temporary file beside `target`, then rename it over `target`.

    A reader (or a re-run after a kill) sees the old file or the whole new one, never half of
    one. The temporary name is fixed per target, so a killed run's leftover is overwritten.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.osdface-partial")
    try:
        with temp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error is the one to report
            temp.unlink(missing_ok=True)
        raise
