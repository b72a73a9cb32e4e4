"""Video constants for the CLI, the service settings and `model.media.video` (no heavy imports)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

VIDEO_SUFFIXES: Final[tuple[str, ...]] = (".mp4", ".mov", ".mkv", ".webm", ".avi")

DEFAULT_CRF: Final[int] = 18  # x264/VP9 constant rate factor: visually near-lossless
MAX_CRF: Final[int] = 63  # VP9's range; x264's 8-bit range ends at 51
DEFAULT_WINDOW_FRAMES: Final[int] = 16  # frames held at once: the memory bound


def is_video(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
