"""Video in, video out: detect, track and smooth, align, restore many frames per call, paste.

    result = restore_video(src, target, detector, restore_fn, VideoOptions())

Frames stream through a bounded window (`FrameWindow`, which `segments.py` shares): each
decoded frame is detected, its faces tracked and their landmarks smoothed, then aligned; when
the window holds `batch_faces` faces (or `window_frames` frames) ALL of their crops go to the
restorer in one call, are pasted back, and the frames are encoded in order. Memory is bounded
by the window, never by the clip's length.

`restore_fn` maps (N, 3, 512, 512) float32 crops in [0, 1], RGB, to restored crops of the same
shape and range: the CLI passes the restorer, the service a low-priority submission to its
model worker. Output goes to a temporary name and is renamed only when complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from model.errors import InvalidInputError, VideoCancelledError
from model.image_processor import pixels_to_tensor
from model.media.faces.align import FACE_SIZE, align_face
from model.media.faces.detect import FaceDetector, select_faces
from model.media.faces.paste import paste_faces
from model.media.video.config import DEFAULT_CRF, DEFAULT_WINDOW_FRAMES, MAX_CRF
from model.media.video.io import Frame as VideoFrame
from model.media.video.io import VideoInfo, VideoSink, VideoSource
from model.media.video.track import FaceTracker, SmoothingConfig, TrackedFace

logger = logging.getLogger(__name__)

RestoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VideoOptions:
    """What the caller asks for one video; `validated()` checks it."""

    codec: str | None = None  # None: libx264, or libvpx-vp9 for .webm
    crf: int = DEFAULT_CRF  # constant rate factor: lower is better and bigger
    start_s: float = 0.0
    duration_s: float | None = None  # None: to the end
    batch_faces: int = 8  # faces per restorer call
    window_frames: int = DEFAULT_WINDOW_FRAMES  # frames held at once (the memory bound)
    strength: float = 1.0
    only_center_face: bool = False
    max_faces: int | None = None
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)

    def validated(self) -> VideoOptions:
        if self.codec is not None and not _is_video_encoder(self.codec):
            raise InvalidInputError(f"{self.codec!r} is not a video encoder of this PyAV build")
        if not (isinstance(self.crf, int) and 0 <= self.crf <= MAX_CRF):
            raise InvalidInputError(f"crf must be an integer 0..{MAX_CRF}, got {self.crf}")
        if self.start_s < 0 or (self.duration_s is not None and self.duration_s <= 0):
            raise InvalidInputError("start must be >= 0 s and duration > 0 s")
        if self.batch_faces < 1 or self.window_frames < 1:
            raise InvalidInputError("batch_faces and window_frames must be positive")
        if not 0.0 <= self.strength <= 1.0:
            raise InvalidInputError(f"strength must be in [0, 1], got {self.strength}")
        if self.max_faces is not None and self.max_faces < 1:
            raise InvalidInputError(f"max_faces must be positive, got {self.max_faces}")
        return replace(self, strength=float(self.strength))


def _is_video_encoder(name: str) -> bool:
    import av

    try:
        return av.Codec(name, "w").type == "video"
    except (av.FFmpegError, ValueError):
        return False


@dataclass(frozen=True)
class VideoProgress:
    """Frames written so far, of `total` (None when the container does not say)."""

    frames: int
    total: int | None
    elapsed_s: float

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.total is None or self.fps <= 0:
            return None
        return max(0, self.total - self.frames) / self.fps


@dataclass(frozen=True)
class VideoResult:
    """The written file and what happened: frames, faces restored, restorer calls, seconds."""

    path: Path
    info: VideoInfo
    frames: int
    faces: int
    frames_with_faces: int
    restorer_calls: int
    seconds: float


@dataclass
class _Pending:
    """One decoded frame waiting for its faces: crops (uint8 RGB 512s) and their affines."""

    frame: VideoFrame
    crops: list[np.ndarray]
    affines: list[np.ndarray]


@dataclass
class FrameCounts:
    """What a `FrameWindow` did: frames encoded, faces restored, restorer calls."""

    frames: int = 0
    faces: int = 0
    frames_with_faces: int = 0
    calls: int = 0


class FrameWindow:
    """Decoded frames in, restored frames encoded into `sink` in order: the one video pipeline.

    `add` detects, tracks, smooths and aligns a frame's faces and holds the frame; once the
    window holds `batch_faces` faces or `window_frames` frames, `flush` restores all of their
    faces in shared restorer calls, pastes them back and encodes the frames. `track_only` runs
    detection and tracking alone (the smoothing state before a piece of a clip: nothing is
    restored or encoded). `on_flush` is called after each flush.
    """

    def __init__(
        self,
        detector: FaceDetector,
        restore_fn: RestoreFn,
        options: VideoOptions,
        sink: VideoSink,
        *,
        on_flush: Callable[[FrameCounts], None] | None = None,
    ) -> None:
        self.detector, self.restore_fn = detector, restore_fn
        self.options, self.sink = options, sink
        self.tracker = FaceTracker(options.smoothing)
        self.counts = FrameCounts()
        self._window: list[_Pending] = []
        self._on_flush = on_flush

    def track_only(self, frame: VideoFrame) -> None:
        _track(frame, self.detector, self.tracker, self.options)

    def add(self, frame: VideoFrame) -> None:
        self._window.append(_prepare(frame, self.detector, self.tracker, self.options))
        faces = sum(len(p.crops) for p in self._window)
        if faces >= self.options.batch_faces or len(self._window) >= self.options.window_frames:
            self.flush()

    def flush(self) -> None:
        if not self._window:
            return
        _restore_window(self._window, self.restore_fn, self.options, self.sink, self.counts)
        self._window.clear()
        if self._on_flush is not None:
            self._on_flush(self.counts)


def check_stop(should_stop: Callable[[], bool] | None, src: Path) -> None:
    """Raise `VideoCancelledError` naming `src` once `should_stop()` turns true."""
    if should_stop is not None and should_stop():
        raise VideoCancelledError(f"{src}: cancelled")


def restore_video(
    src: Path,
    target: Path,
    detector: FaceDetector,
    restore_fn: RestoreFn,
    options: VideoOptions,
    *,
    progress: Callable[[VideoProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> VideoResult:
    """Restore every face of `src` into `target` (never the same file); the result.

    Raises a `model.errors.VideoError` naming the file for bad input, `VideoCancelledError` when
    `should_stop()` turns true; in every failure nothing is left at `target`.
    """
    options = options.validated()
    if Path(src).resolve() == Path(target).resolve():
        raise InvalidInputError(f"{src}: the output would overwrite the input")
    started = time.monotonic()
    with VideoSource(src, start_s=options.start_s, duration_s=options.duration_s) as source:
        total = source.expected_frames()
        sink = VideoSink(target, source.info, source.audio, codec=options.codec, crf=options.crf)

        def report(counts: FrameCounts) -> None:
            if progress is not None:
                progress(VideoProgress(counts.frames, total, time.monotonic() - started))

        frames = FrameWindow(detector, restore_fn, options, sink, on_flush=report)
        try:
            for item in source.items():
                check_stop(should_stop, src)
                if isinstance(item, VideoFrame):
                    frames.add(item)
                else:
                    sink.write_audio(item)
            frames.flush()
            path = sink.commit()
        except BaseException:
            sink.abort()
            raise
    seconds, counters = time.monotonic() - started, frames.counts
    # Callers say it in their own words (the command's line per file, a job's line): details.
    logger.debug(
        "%s: frames %d, faces %d, model calls %d, %.1f frames/s -> %s",
        src,
        counters.frames,
        counters.faces,
        counters.calls,
        counters.frames / max(seconds, 1e-9),
        path,
    )
    return VideoResult(
        path,
        source.info,
        counters.frames,
        counters.faces,
        counters.frames_with_faces,
        counters.calls,
        seconds,
    )


def _track(
    frame: VideoFrame, detector: FaceDetector, tracker: FaceTracker, options: VideoOptions
) -> list[TrackedFace]:
    height, width = frame.rgb.shape[:2]
    faces = select_faces(
        detector.detect(frame.rgb),
        width,
        height,
        only_center_face=options.only_center_face,
        max_faces=options.max_faces,
    )
    return tracker.update(faces)


def _prepare(
    frame: VideoFrame, detector: FaceDetector, tracker: FaceTracker, options: VideoOptions
) -> _Pending:
    crops, affines = [], []
    for tracked in _track(frame, detector, tracker, options):
        crop, affine = align_face(frame.rgb, tracked.landmarks)
        crops.append(crop)
        affines.append(affine)
    return _Pending(frame, crops, affines)


def _restore_window(
    window: Sequence[_Pending],
    restore_fn: RestoreFn,
    options: VideoOptions,
    sink: VideoSink,
    counters: FrameCounts,
) -> None:
    """Restore the window's faces in calls of `batch_faces`, paste them, encode the frames."""
    crops = [crop for pending in window for crop in pending.crops]
    restored: list[np.ndarray] = []
    for lo in range(0, len(crops), options.batch_faces):
        chunk = crops[lo : lo + options.batch_faces]
        restored += _to_arrays(restore_fn(pixels_to_tensor(chunk)), len(chunk))
        counters.calls += 1
    offset = 0
    for pending in window:
        count = len(pending.crops)
        if count:
            faces = restored[offset : offset + count]
            paste_faces(pending.frame.rgb, faces, pending.affines, strength=options.strength)
            counters.frames_with_faces += 1
        offset += count
        sink.write(pending.frame)
        counters.frames += 1
        counters.faces += count


def _to_arrays(restored: torch.Tensor, count: int) -> list[np.ndarray]:
    """(N, 3, 512, 512) in [0, 1] -> N (512, 512, 3) float32 arrays, checked and clipped."""
    expected = (count, 3, FACE_SIZE, FACE_SIZE)
    if tuple(restored.shape) != expected:
        raise InvalidInputError(f"restored faces must be {expected}, got {tuple(restored.shape)}")
    array = restored.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    if not np.isfinite(array).all():
        raise InvalidInputError("restored faces contain NaN or infinity")
    return list(np.clip(array, 0.0, 1.0))
