"""Video file names: the suffixes the CLI and the service treat as video (no heavy imports)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

VIDEO_SUFFIXES: Final[tuple[str, ...]] = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def is_video(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
