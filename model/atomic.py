"""The one atomic write: a whole new file or the old one, never half of one.

Every output the project writes (restored photos and videos, reports, weight files, stamps)
goes through `write_atomic` (bytes in hand) or `atomic_path` (a writer that streams to a path).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def partial_name(target: Path) -> Path:
    """The hidden temporary name beside `target`; fixed, so a killed run's leftover is reused."""
    return target.with_name(f".{target.name}.osdface-partial")


@contextlib.contextmanager
def atomic_path(target: Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed over `target`.

    On any error the temporary file is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = partial_name(target)
    try:
        yield temp
        if fsync:
            with temp.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error is the one to report
            temp.unlink(missing_ok=True)
        raise


def write_atomic(target: Path, data: bytes) -> None:
    """Write `data` to `target` through a temporary file beside it and a rename."""
    with atomic_path(target) as temp:
        temp.write_bytes(data)
