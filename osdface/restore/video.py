"""`osdface restore` for video files: the flags and the options they ask for.

`osdface/restore/command.py` registers these flags; `osdface/restore/runners.py` restores each video through
`model/media/video/` (decoding, tracking, encoding).
"""

from __future__ import annotations

import argparse
import logging

from model.media.video.config import DEFAULT_CRF, DEFAULT_WINDOW_FRAMES, VIDEO_SUFFIXES, is_video

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_SUFFIXES", "add_video_arguments", "is_video", "video_options"]


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


def video_options(args: argparse.Namespace):
    """The VideoOptions these flags ask for (checked: InvalidInputError if out of range)."""
    from model.media.video.restore import VideoOptions
    from model.media.video.track import SmoothingConfig

    return VideoOptions(
        codec=args.codec,
        crf=args.crf,
        start_s=args.start,
        duration_s=args.duration,
        batch_faces=args.batch_size,
        window_frames=args.window_frames,
        strength=args.strength,
        only_center_face=args.only_center_face,
        max_faces=args.max_faces,
        smoothing=SmoothingConfig(enabled=not args.no_smoothing),
    ).validated()
