"""One range of a video restored as segments, each its own file, then joined without re-encoding.

    segments = plan_segments(info, options, segment_frames=64)
    for segment in segments:  # in any order, on any replica: redo those without a file
        restore_segment(src, folder / f"{segment.index:05d}.mp4", detector, fn, options, segment)
    join_segments([folder / f"{s.index:05d}.mp4" for s in segments], src, target, options)

A segment is a span of presentation time, [start_s, end_s): segment k starts k * segment_frames
frame durations after the range's start. A frame belongs to the segment its timestamp falls in,
never to one found by counting decoded frames, so every replica that decodes the file cuts it
alike, and a variable-frame-rate clip too (a segment then holds about `segment_frames` frames).

A segment file holds video only, a fresh encode (so it starts on a key frame), with timestamps
on the range's clock, the clock of `restore_video`'s output. It is written under a temporary
name, flushed to disk and renamed: a segment file that exists is complete. A segment that holds
no frame (a gap in a variable-frame-rate clip) is an empty file.

Smoothing carries over a boundary: before a segment's first frame, its tracker sees the frames
of the `overlap_frames` frame durations before it (detected and tracked, neither restored nor
encoded), so its landmarks start about where a single pass would have them.

The join copies the segments' video packets in order, and the source's audio packets of the
range as `restore_video` does, into the target, written atomically.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Final

import av
from av.bitstream import BitStreamFilterContext
from av.video.stream import VideoStream

from model.atomic import atomic_path, write_atomic
from model.errors import InvalidInputError, VideoDecodeError, VideoEncodeError
from model.media.faces.detect import FaceDetector
from model.media.video.io import Frame as VideoFrame
from model.media.video.io import VideoInfo, VideoSink, VideoSource, muxer_name
from model.media.video.restore import (
    FrameCounts,
    FrameWindow,
    RestoreFn,
    VideoOptions,
    VideoProgress,
    check_stop,
)

logger = logging.getLogger(__name__)

DEFAULT_OVERLAP_FRAMES: Final[int] = 16  # about two of the one-euro filter's time constants
# A container may say the video runs a little longer than it does (audio past the end,
# rounding): the last segment takes up to this many frames more rather than risk being empty.
_TAIL_SLACK_FRAMES: Final[int] = 2
_EPS: Final[float] = 1e-6  # seconds: `VideoSource`'s tolerance at a range's ends
# Containers whose files give back the timestamps they were written with, start offset included
# (AVI does not): segment files use one of these.
SEGMENT_SUFFIXES: Final[frozenset[str]] = frozenset({".mp4", ".mov", ".mkv", ".webm"})


@dataclass(frozen=True)
class Segment:
    """Frames whose time falls in [start_s, end_s), in the source's seconds; end None: to the
    clip's end. The first segment starts at the range's start, the last ends at its end."""

    index: int
    start_s: float
    end_s: float | None

    def holds(self, t: float) -> bool:
        """Whether a frame at `t` s belongs here (the same rule as `VideoSource`'s range)."""
        return t >= self.start_s - _EPS and (self.end_s is None or t < self.end_s - _EPS)


@dataclass(frozen=True)
class SegmentResult:
    """One segment written: frames encoded, faces restored, seconds taken."""

    frames: int
    faces: int
    seconds: float


@dataclass(frozen=True)
class JoinResult:
    """The joined video: its path, its frames, and how many segments held frames."""

    path: Path
    frames: int
    segments: int


def segment_suffix(target: Path) -> str:
    """The suffix for the segment files of `target`: its own, or `.mp4` for an `.avi`."""
    suffix = Path(target).suffix.lower()
    return suffix if suffix in SEGMENT_SUFFIXES else ".mp4"


def plan_segments(info: VideoInfo, options: VideoOptions, segment_frames: int) -> list[Segment]:
    """The segments of the range `options` asks for, `segment_frames` frame durations each.

    `segment_frames` is a positive multiple of `options.window_frames`. The same file and
    options give the same plan on every machine. Without a known length, one segment.
    """
    options = options.validated()
    if segment_frames < 1 or segment_frames % options.window_frames:
        raise InvalidInputError(
            f"segment_frames must be a positive multiple of window_frames "
            f"({options.window_frames}), got {segment_frames}"
        )
    start, end = _range(options)
    stop = _range_stop(info, end)
    if stop is None:
        return [Segment(0, start, end)]
    base = Fraction(max(start, info.video_start_s))  # no frame comes before the video starts
    step = Fraction(segment_frames) / info.rate
    frames = round((Fraction(stop) - base) * info.rate)
    count = max(1, math.ceil((frames - _TAIL_SLACK_FRAMES) / segment_frames))
    starts = [start, *(float(base + k * step) for k in range(1, count))]
    ends = [*starts[1:], end]
    return [Segment(k, s, e) for k, (s, e) in enumerate(zip(starts, ends, strict=True))]


def _range(options: VideoOptions) -> tuple[float, float | None]:
    """The range's start and end in seconds, computed as `VideoSource` computes them."""
    start = max(0.0, float(options.start_s))
    return start, None if options.duration_s is None else start + float(options.duration_s)


def _range_stop(info: VideoInfo, end: float | None) -> float | None:
    if end is None or info.video_end_s is None:
        return info.video_end_s if end is None else end
    return min(end, info.video_end_s)


def restore_segment(
    src: Path,
    segment_path: Path,
    detector: FaceDetector,
    restore_fn: RestoreFn,
    options: VideoOptions,
    segment: Segment,
    *,
    overlap_frames: int = DEFAULT_OVERLAP_FRAMES,
    progress: Callable[[VideoProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SegmentResult:
    """Restore the frames of `segment` into `segment_path` (video only); what was done.

    Decodes from the key frame before the warm-up, tracks the faces of the `overlap_frames`
    frame durations before the segment (not restored), then restores and encodes the frames
    the segment holds. `restore_fn` and `progress` as for `restore_video` (progress counts this
    segment's frames). Raises as `restore_video` does, `VideoCancelledError` included; in every
    failure `segment_path` is left as it was (absent, or a complete earlier run).
    """
    options = options.validated()
    src, segment_path = Path(src), Path(segment_path)
    if segment_path.suffix.lower() not in SEGMENT_SUFFIXES:
        raise InvalidInputError(
            f"{segment_path}: a segment file ends in one of {', '.join(sorted(SEGMENT_SUFFIXES))}"
        )
    if overlap_frames < 0:
        raise InvalidInputError(f"overlap_frames must be >= 0, got {overlap_frames}")
    if src.resolve() == segment_path.resolve():
        raise InvalidInputError(f"{src}: the output would overwrite the input")
    started = time.monotonic()
    info, origin = _range_clock(src, options)
    start, _ = _range(options)
    segment_path.parent.mkdir(parents=True, exist_ok=True)
    warm_from = max(start, segment.start_s - (overlap_frames + 0.5) / float(info.rate))
    total = _expected_frames(info, segment)

    def report(counts: FrameCounts) -> None:
        if progress is not None:
            progress(VideoProgress(counts.frames, total, time.monotonic() - started))

    sink = VideoSink(segment_path, info, None, codec=options.codec, crf=options.crf)
    window = FrameWindow(detector, restore_fn, options, sink, on_flush=report)
    try:
        with VideoSource(src, start_s=warm_from, origin_s=origin) as source:
            for frame, t in _timed_frames(source, origin, should_stop):
                if t < segment.start_s - _EPS:
                    window.track_only(frame)  # the smoothing state a single pass would have
                elif segment.holds(t):
                    window.add(frame)
                else:
                    break
        window.flush()
        if window.counts.frames:
            sink.commit(fsync=True)
        else:
            write_atomic(segment_path, b"")
    except BaseException:
        sink.abort()
        raise
    counts, seconds = window.counts, time.monotonic() - started
    logger.debug(
        "%s: segment %d, frames %d, faces %d, model calls %d, %.1f s -> %s",
        src,
        segment.index,
        counts.frames,
        counts.faces,
        counts.calls,
        seconds,
        segment_path,
    )
    return SegmentResult(counts.frames, counts.faces, seconds)


def _timed_frames(
    source: VideoSource, origin: float, should_stop: Callable[[], bool] | None
) -> Iterator[tuple[VideoFrame, float]]:
    """The source's frames with their times in the source's seconds (as its range sees them).

    Two frames at one time would share a segment's timestamp: refused, since no container
    the join writes takes them.
    """
    tb = source.info.time_base
    shift = 0 if origin == 0.0 else round(origin / tb)  # what `VideoSource.items` took off
    last: int | None = None
    for item in source.items():
        check_stop(should_stop, source.path)
        if isinstance(item, VideoFrame):
            if last is not None and item.pts <= last:
                t = float((item.pts + shift) * tb)
                raise VideoDecodeError(f"{source.path}: two frames at {t:.3f} s or out of order")
            last = item.pts
            yield item, float((item.pts + shift) * tb)


def _range_clock(src: Path, options: VideoOptions) -> tuple[VideoInfo, float]:
    """The source's description and the range's origin: 0 for a range from the clip's start,
    else the first kept frame's time, as `restore_video` has it (decodes up to that frame)."""
    start, _ = _range(options)
    with VideoSource(src, start_s=start, duration_s=options.duration_s) as source:
        if source.origin_s is None:
            next((i for i in source.items() if isinstance(i, VideoFrame)), None)
        assert source.origin_s is not None  # set with the first frame, or the source raised
        return source.info, source.origin_s


def _expected_frames(info: VideoInfo, segment: Segment) -> int | None:
    end = segment.end_s if segment.end_s is not None else info.video_end_s
    return None if end is None else max(0, round((end - segment.start_s) * float(info.rate)))


def join_segments(
    segment_paths: Sequence[Path], src: Path, target: Path, options: VideoOptions
) -> JoinResult:
    """Remux the segments' video packets, in order, and `src`'s audio of the range into
    `target`, written atomically; the result.

    No frame is re-encoded. Raises `VideoEncodeError` when a segment is missing, the segments
    were made with other encoder settings or are out of order, and `VideoDecodeError` when the
    segments of a whole clip fall short of its frame count or length (a truncated upload).
    """
    options = options.validated()
    target, parts = Path(target), [Path(p) for p in segment_paths]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise VideoEncodeError(f"{target}: segment files missing: {', '.join(missing)}")
    filled = [p for p in parts if p.stat().st_size > 0]
    if not filled:
        raise VideoEncodeError(f"{target}: no segment holds a frame")
    info, origin = _range_clock(src, options)
    start, _ = _range(options)
    with (
        VideoSource(src, start_s=start, duration_s=options.duration_s, origin_s=origin) as source,
        atomic_path(target) as temp,
        av.open(str(temp), mode="w", format=muxer_name(target)) as out,
    ):
        try:
            video = _VideoOut(out, filled[0], info, target)
            audio = None if source.audio is None else out.add_stream_from_template(source.audio)
            joined = _SegmentPackets(filled, target)
            for packet in heapq.merge(joined, source.audio_packets(), key=_packet_time):
                if packet.stream.type == "video":
                    out.mux(video.packets(packet))
                else:
                    packet.stream = audio
                    out.mux(packet)
            out.mux(video.packets(None))
        except av.FFmpegError as exc:
            raise VideoEncodeError(f"{target}: joining the segments failed: {exc}") from exc
        if start == 0.0 and options.duration_s is None:
            source.check_whole(joined.frames, float(joined.last_pts_s))
    logger.debug("%s: %d segments, %d frames joined", target, len(filled), joined.frames)
    return JoinResult(target, joined.frames, len(filled))


class _VideoOut:
    """The output's video stream: the first segment's codec parameters (rotation included) on
    the source's clock. AVI takes H.264 and HEVC with start codes, not MP4's length fields."""

    def __init__(
        self, out: av.container.OutputContainer, first: Path, info: VideoInfo, target: Path
    ) -> None:
        with av.open(str(first)) as container:
            template = container.streams.video[0]
            stream = out.add_stream_from_template(template)
            if not isinstance(stream, VideoStream):
                raise VideoEncodeError(f"{target}: {first} holds no video stream")
            codec = template.codec_context.name
            self._annexb = None
            if out.format.name == "avi" and codec in ("h264", "hevc"):
                self._annexb = BitStreamFilterContext(f"{codec}_mp4toannexb", template, stream)
        stream.time_base = info.time_base
        stream.codec_context.framerate = info.rate
        self.stream = stream

    def packets(self, packet: av.Packet | None) -> list[av.Packet]:
        """`packet` as the output takes it; None: what the filter still holds, at the end."""
        if self._annexb is None:
            out = [] if packet is None else [packet]
        else:
            out = self._annexb.filter(packet)
        for each in out:
            each.stream = self.stream
        return out


def _packet_time(packet: av.Packet) -> Fraction:
    ts = packet.dts if packet.dts is not None else packet.pts
    return Fraction(ts or 0) * Fraction(packet.time_base)


class _SegmentPackets:
    """The segments' video packets in order, checked: one encoder's settings, a key frame
    first, each segment after the one before. Counts frames and the last frame's time.

    Decode timestamps are derived from the presentation ones (Matroska stores none): the frame
    decoded i-th gets the (i - depth)-th smallest pts of its segment, `depth` being the most any
    segment's encoder reordered, and earlier frames step back from the first. With one depth
    for all, decode times run on without a gap at a boundary (AVI counts frames by them).
    """

    def __init__(self, paths: Sequence[Path], target: Path) -> None:
        self.paths, self.target = paths, target
        self.frames = 0
        self.last_pts_s = Fraction(-(10**9))
        self._last_dts_s = Fraction(-(10**9))
        self._extradata: bytes | None = None
        self._depth, self._step = 0, 1
        for path in paths:  # one pass over the packets' headers, no decoding
            with av.open(str(path)) as container:
                pts = [p.pts for p in _frame_packets(container) if p.pts is not None]
            self._depth = max(self._depth, _reorder_depth(pts, path, target))
            steps = [b - a for a, b in itertools.pairwise(sorted(pts))]
            self._step = min(steps, default=self._step)

    def __iter__(self) -> Iterator[av.Packet]:
        for path in self.paths:
            with av.open(str(path)) as container:
                self._check_settings(path, container.streams.video[0])
                packets = list(_frame_packets(container))
                self._check_order(path, packets)
                yield from self._with_dts(packets)

    def _check_settings(self, path: Path, stream: VideoStream) -> None:
        extradata = bytes(stream.codec_context.extradata or b"")
        if self._extradata is None:
            self._extradata = extradata
        elif extradata != self._extradata:
            raise VideoEncodeError(f"{self.target}: {path} was encoded with other settings")

    def _check_order(self, path: Path, packets: list[av.Packet]) -> None:
        if not packets or not packets[0].is_keyframe:
            raise VideoEncodeError(f"{self.target}: {path} does not start on a key frame")
        if min(_pts_s(p) for p in packets) <= self.last_pts_s:
            raise VideoEncodeError(f"{self.target}: {path} overlaps the segment before it")

    def _with_dts(self, packets: list[av.Packet]) -> Iterator[av.Packet]:
        order = sorted(int(p.pts) for p in packets if p.pts is not None)
        for i, packet in enumerate(packets):
            tb = Fraction(packet.time_base)
            k = i - self._depth
            dts = order[k] if k >= 0 else order[0] + k * self._step
            if dts * tb <= self._last_dts_s:  # frames closer than `depth` across a boundary
                dts = math.floor(self._last_dts_s / tb) + 1
            packet.dts = dts
            self._last_dts_s = dts * tb
            self.frames += 1
            self.last_pts_s = max(self.last_pts_s, _pts_s(packet))
            yield packet


def _frame_packets(container: av.container.InputContainer) -> Iterator[av.Packet]:
    """The first video stream's packets that hold a frame, in decode order."""
    for packet in container.demux(container.streams.video[0]):
        if packet.size and packet.pts is not None:
            yield packet


def _pts_s(packet: av.Packet) -> Fraction:
    return Fraction(packet.pts or 0) * Fraction(packet.time_base)


def _reorder_depth(pts: list[int], path: Path, target: Path) -> int:
    """How many places a frame moves between decode and presentation order, at most."""
    rank = {value: i for i, value in enumerate(sorted(pts))}
    if len(rank) < len(pts):
        raise VideoEncodeError(f"{target}: {path} has two frames at one time")
    return max((i - rank[value] for i, value in enumerate(pts)), default=0)
