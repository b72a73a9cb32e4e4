"""`osdface restore` for video files: the flags and the options they ask for.

osdface/restore/flags.py registers these flags and osdface/restore/command.py reads them once
into the run's configuration; osdface/restore/runners.py restores each video through
`model/media/video/` (decoding, tracking, encoding).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from model.media.video.config import DEFAULT_CRF, DEFAULT_WINDOW_FRAMES, VIDEO_SUFFIXES, is_video

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_FLAGS", "VIDEO_SUFFIXES", "add_video_arguments", "is_video", "video_options"]


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video (.mp4 .mov .mkv .webm .avi)")
    g.add_argument("--codec", default=None, help="encoder (default: libx264; libvpx-vp9 for webm)")
    g.add_argument(
        "--crf", type=int, default=DEFAULT_CRF, help="quality, lower = better (%(default)s)"
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


def video_options(
    *,
    codec: str | None,
    crf: int,
    start: float,
    duration: float | None,
    window_frames: int,
    no_smoothing: bool,
    batch_faces: int,
    strength: float,
    only_center_face: bool,
    max_faces: int,
) -> Any:
    """The VideoOptions these flags ask for (checked: InvalidInputError if out of range)."""
    from model.media.video.restore import VideoOptions
    from model.media.video.track import SmoothingConfig

    return VideoOptions(
        codec=codec,
        crf=crf,
        start_s=start,
        duration_s=duration,
        batch_faces=batch_faces,
        window_frames=window_frames,
        strength=strength,
        only_center_face=only_center_face,
        max_faces=max_faces,
        smoothing=SmoothingConfig(enabled=not no_smoothing),
    ).validated()


# The video flags' names, as `video_options` takes them (the parsed flags' dests).
VIDEO_FLAGS = ("codec", "crf", "start", "duration", "window_frames", "no_smoothing")
