"""`osdface restore` for video files: the flags, checked without torch, and the options they ask
for.

osdface/restore/flags.py registers these flags and osdface/restore/command.py reads them once
into a `VideoFlags` (checked here: PyAV and plain numbers, no torch, so a mistake is answered at
once); osdface/restore/runners.py turns them into `model.media.video.restore.VideoOptions` and
restores each video through `model/media/video/` (decoding, tracking, encoding).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.media.video.config import (
    DEFAULT_CRF,
    DEFAULT_WINDOW_FRAMES,
    MAX_CRF,
    VIDEO_SUFFIXES,
    is_video,
)
from osdface.common import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "VIDEO_FLAGS",
    "VIDEO_SUFFIXES",
    "VideoFlags",
    "add_video_arguments",
    "check_start",
    "is_video",
    "video_flags",
]


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video (.mp4 .mov .mkv .webm .avi)")
    g.add_argument("--codec", default=None, help="encoder (default: libx264; libvpx-vp9 for webm)")
    g.add_argument(
        "--crf",
        type=int,
        default=DEFAULT_CRF,
        help=f"quality, lower = better (0..{MAX_CRF}; %(default)s)",
    )
    g.add_argument("--start", type=float, default=0.0, help="seconds to skip (%(default)s)")
    g.add_argument("--duration", type=float, default=None, help="seconds to restore (all)")
    g.add_argument(
        "--window-frames",
        type=int,
        default=DEFAULT_WINDOW_FRAMES,
        help="frames held at once; their faces share restorer calls of --batch-size (%(default)s)",
    )
    g.add_argument("--no-smoothing", action="store_true", help="align on raw landmarks")


# The video flags' names, as `video_flags` takes them (the parsed flags' dests).
VIDEO_FLAGS = ("codec", "crf", "start", "duration", "window_frames", "no_smoothing")


@dataclass(frozen=True)
class VideoFlags:
    """The video flags of a run, checked; plain data (no torch)."""

    codec: str | None = None  # None: libx264, or libvpx-vp9 for .webm
    crf: int = DEFAULT_CRF
    start: float = 0.0  # seconds
    duration: float | None = None  # seconds; None: to the end
    window_frames: int = DEFAULT_WINDOW_FRAMES
    smoothing: bool = True

    def options(
        self, *, batch_faces: int, strength: float, only_center_face: bool, max_faces: int
    ) -> Any:
        """The model's `VideoOptions` (imports torch: call it once the model loads)."""
        from model.media.video.restore import VideoOptions
        from model.media.video.track import SmoothingConfig

        return VideoOptions(
            codec=self.codec,
            crf=self.crf,
            start_s=self.start,
            duration_s=self.duration,
            batch_faces=batch_faces,
            window_frames=self.window_frames,
            strength=strength,
            only_center_face=only_center_face,
            max_faces=max_faces,
            smoothing=SmoothingConfig(enabled=self.smoothing),
        ).validated()


def video_flags(
    *,
    codec: str | None,
    crf: int,
    start: float,
    duration: float | None,
    window_frames: int,
    no_smoothing: bool,
) -> VideoFlags:
    """The checked video flags; UsageError naming the flag (PyAV is asked about --codec)."""
    if not 0 <= crf <= MAX_CRF:
        raise UsageError(
            f"--crf must be 0..{MAX_CRF} (got {crf}): lower is better and bigger, "
            f"{DEFAULT_CRF} is visually near-lossless"
        )
    if not start >= 0:  # also NaN
        raise UsageError(f"--start must be at least 0 s (got {start:g})")
    if duration is not None and not duration > 0:
        raise UsageError(f"--duration must be over 0 s (got {duration:g})")
    if window_frames < 1:
        raise UsageError(f"--window-frames must be at least 1 (got {window_frames})")
    if codec is not None and not _is_video_encoder(codec):
        raise UsageError(
            f"--codec {codec} is not a video encoder of this PyAV build "
            "(libx264 and libvpx-vp9 are the usual ones)"
        )
    return VideoFlags(codec, crf, float(start), duration, window_frames, not no_smoothing)


def _is_video_encoder(name: str) -> bool:
    import av

    try:
        return av.Codec(name, "w").type == "video"
    except (av.FFmpegError, ValueError):
        return False


def check_start(start: float, videos: Sequence[Path]) -> None:
    """UsageError when `--start` is past the end of a clip (its length read from the container,
    without decoding); clips that cannot be opened are left to fail in the run, named."""
    if start <= 0:
        return
    from model.errors import VideoError
    from model.media.video.io import VideoSource

    short: list[tuple[Path, float]] = []
    for path in videos:
        try:
            with VideoSource(path) as source:
                length = source.info.duration_s
        except (VideoError, OSError):
            continue
        if length is not None and start >= length:
            short.append((path, length))
    if len(short) == 1 and len(videos) == 1:
        raise UsageError(f"--start {start:g} s is past the clip's end ({short[0][1]:.1f} s)")
    if short:
        named = ", ".join(f"{p.name} ({length:.1f} s)" for p, length in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise UsageError(
            f"--start {start:g} s is past the end of {len(short)} of the clips: {named}{more}; "
            "restore those in a run of their own"
        )
