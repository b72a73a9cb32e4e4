"""`osdface restore` for video files: the flags, and the loop over the videos of a run.

`osdface/restore.py` registers these flags and hands the video files here; everything about
decoding, tracking and encoding lives in `model/video/`. A failure in one video is one log
line and a non-zero exit code at the end; the other files still run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from model.video.config import DEFAULT_CRF, DEFAULT_WINDOW_FRAMES, VIDEO_SUFFIXES, is_video

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_SUFFIXES", "add_video_arguments", "is_video", "restore_videos", "video_options"]


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
    from model.video.restore import VideoOptions
    from model.video.track import SmoothingConfig

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


def restore_videos(args: argparse.Namespace, videos: list[Path], restorer, device) -> int:
    """Restore each video into `args.output` (same name and container); the number failed.

    An existing output is skipped (re-running resumes); an output that would be the input is
    refused.
    """
    from tqdm import tqdm

    from model.errors import OSDFaceError
    from model.video.restore import restore_video
    from service.settings import Settings
    from service.state import load_detector

    options = video_options(args)
    detector = load_detector(Settings(weights_dir=args.weights, detector=args.detector), device)
    extra = {"seed": args.seed} if args.latent == "sample" else {}

    def restore_fn(crops):
        return restorer(crops, **extra).images

    failed = 0
    for src in videos:
        target = args.output / src.name
        if target.exists():
            logger.info("%s: %s exists, skipped", src, target)
            continue
        with tqdm(unit="frame", desc=src.name, dynamic_ncols=True) as bar:

            def progress(p, bar=bar) -> None:
                bar.total = p.total
                bar.update(p.frames - bar.n)

            try:
                result = restore_video(
                    src, target, detector, restore_fn, options, progress=progress
                )
            except (OSDFaceError, OSError) as exc:
                failed += 1
                logger.error("%s: failed: %s", src, exc)
                continue
        logger.info(
            "%s: %d frames, %d faces, %.2f frames/s -> %s",
            src,
            result.frames,
            result.faces,
            result.frames / max(result.seconds, 1e-9),
            result.path,
        )
    return failed
