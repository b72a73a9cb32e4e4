"""Streaming video input and output with PyAV: frames one at a time, audio packets copied.

`VideoSource` demuxes the video and (first) audio stream in file order and yields decoded video
frames and untouched audio packets, within an optional time range. `VideoSink` encodes frames
with the input's frame rate, size and time base, remuxes the audio packets unchanged, keeps the
rotation (display matrix) and writes to a temporary name beside the target, renamed into place
only when everything was written.

Frames are (H, W, 3) uint8 RGB inside; YUV exists only inside PyAV. Every error names the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import av
import numpy as np
from av.audio.stream import AudioStream
from av.video.stream import VideoStream

from model.errors import (
    NoVideoStreamError,
    UnsupportedVideoCodecError,
    VideoDecodeError,
    VideoEncodeError,
)
from model.media.video.config import DEFAULT_CRF, VIDEO_SUFFIXES  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from av.sidedata.sidedata import SideDataContainer

logger = logging.getLogger(__name__)

# Decoders we let untrusted files reach: the common camera and web codecs. Every FFmpeg decoder
# is attack surface; the exotic ones are refused with a clear message instead.
ALLOWED_DECODERS: Final[frozenset[str]] = frozenset(
    {"h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mpeg2video", "mjpeg", "prores"}
)

# Encoder per output container when the caller names none.
DEFAULT_CODECS: Final[dict[str, str]] = {
    ".mp4": "libx264",
    ".mov": "libx264",
    ".mkv": "libx264",
    ".avi": "libx264",
    ".webm": "libvpx-vp9",
}


@dataclass(frozen=True)
class VideoInfo:
    """What the output copies from the input. `frames` is 0 when the container does not say."""

    width: int
    height: int
    rate: Fraction
    time_base: Fraction
    frames: int
    duration_s: float | None
    codec: str
    has_audio: bool
    video_start_s: float = 0.0  # the video stream's first presentation time
    video_end_s: float | None = None  # its end: the stream's own duration, else the container's


@dataclass(frozen=True)
class Frame:
    """One decoded frame: (H, W, 3) uint8 RGB pixels, its pts in the stream's time base."""

    rgb: np.ndarray
    pts: int
    duration: int
    rotation_matrix: tuple[int, ...] | None


def _fail(path: Path, what: str, exc: BaseException | None = None) -> VideoDecodeError:
    detail = f": {_words(exc)}" if exc is not None else ""
    return VideoDecodeError(f"{path}: {what}{detail}")


def _words(exc: BaseException) -> str:
    """FFmpeg's reason alone: PyAV's message adds the error number and the file's path, which
    the caller's message already names."""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc)


class VideoSource:
    """An opened input video; iterate `items()` once. Use as a context manager.

    Timestamps come out less `origin_s`: by default 0 for a range from the clip's start, else
    the first kept frame's time (set when decoded); pieces of one range pass the range's.
    """

    def __init__(
        self,
        path: Path,
        *,
        start_s: float = 0.0,
        duration_s: float | None = None,
        origin_s: float | None = None,
    ):
        self.path = Path(path)
        self.start_s = max(0.0, float(start_s))
        self.end_s = None if duration_s is None else self.start_s + float(duration_s)
        self.origin_s = (0.0 if self.start_s == 0.0 else None) if origin_s is None else origin_s
        try:
            self._container = av.open(str(self.path), mode="r")
        except av.FFmpegError as exc:
            raise _fail(self.path, "not a readable video file", exc) from exc
        except OSError as exc:
            raise _fail(self.path, "cannot be opened", exc) from exc
        try:
            self.video, self.audio = self._pick_streams()
        except Exception:
            self._container.close()
            raise
        self.info = self._describe()

    def _pick_streams(self) -> tuple[VideoStream, AudioStream | None]:
        streams = self._container.streams
        if not streams.video:
            raise NoVideoStreamError(f"{self.path}: the file has no video stream")
        video = streams.video[0]
        name = video.codec_context.name if video.codec_context else "unknown"
        if name not in ALLOWED_DECODERS:
            raise UnsupportedVideoCodecError(
                f"{self.path}: video codec {name!r} is not supported "
                f"(use one of {', '.join(sorted(ALLOWED_DECODERS))}; re-encode with ffmpeg)"
            )
        video.thread_type = "AUTO"
        return video, (streams.audio[0] if streams.audio else None)

    def _describe(self) -> VideoInfo:
        v = self.video
        rate = v.average_rate or v.guessed_rate or v.base_rate
        if not rate or v.codec_context.width <= 0 or v.codec_context.height <= 0:
            raise _fail(self.path, "the video stream has no frame size or frame rate")
        if v.time_base is None:
            raise _fail(self.path, "the video stream has no time base")
        duration = (
            float(self._container.duration / av.time_base) if self._container.duration else None
        )
        start = float((v.start_time or 0) * v.time_base)
        if v.duration:
            end: float | None = start + float(v.duration * v.time_base)
        else:
            first = self._container.start_time
            end = None if duration is None else duration + (first or 0) / av.time_base
        return VideoInfo(
            width=v.codec_context.width,
            height=v.codec_context.height,
            rate=Fraction(rate),
            time_base=Fraction(v.time_base),
            frames=int(v.frames or 0),
            duration_s=duration,
            codec=v.codec_context.name,
            has_audio=self.audio is not None,
            video_start_s=start,
            video_end_s=end,
        )

    def expected_frames(self) -> int | None:
        """Frames in the asked range, when the container says (for progress and ETA)."""
        info = self.info
        if self.start_s == 0.0 and self.end_s is None:
            return info.frames or None
        total_s = info.duration_s
        if total_s is None:
            return None
        end = total_s if self.end_s is None else min(self.end_s, total_s)
        return max(0, round((end - self.start_s) * float(info.rate)))

    def items(self) -> Iterator[Frame | av.Packet]:
        """Decoded video frames and raw audio packets in file order, within the range.

        Audio packets keep their bytes; video and audio timestamps are shifted by `origin_s`.
        """
        streams = [s for s in (self.video, self.audio) if s is not None]
        tb = self.info.time_base
        if self.start_s > 0:
            self._seek()
        early_audio: list[av.Packet] = []  # after a seek, until the first kept frame is known
        decoded, last_s = 0, 0.0
        try:
            for packet in self._container.demux(*streams):
                if packet.stream is self.audio:
                    if self.origin_s is None:
                        early_audio.append(packet)
                    elif (kept := self._audio_in_range(packet, self.origin_s)) is not None:
                        yield kept
                    continue
                for frame in packet.decode():
                    if not isinstance(frame, av.VideoFrame) or frame.pts is None:
                        continue
                    t = float(frame.pts * tb)
                    if t < self.start_s - 1e-6:
                        continue
                    if self.end_s is not None and t >= self.end_s - 1e-6:
                        return
                    if self.origin_s is None:
                        self.origin_s = t
                        kept_early = (self._audio_in_range(a, t) for a in early_audio)
                        yield from (a for a in kept_early if a is not None)
                        early_audio.clear()
                    decoded, last_s = decoded + 1, t
                    shift = 0 if self.origin_s == 0.0 else round(self.origin_s / tb)
                    yield self._frame(frame, frame.pts - shift)
        except av.FFmpegError as exc:
            raise _fail(self.path, f"decoding failed after {decoded} frames", exc) from exc
        self._check_complete(decoded, last_s)

    def audio_packets(self) -> Iterator[av.Packet]:
        """The range's audio packets as `items()` yields them, with no video decoded."""
        if self.audio is None or self.origin_s is None:
            return
        if self.start_s > 0:
            self._seek()
        end = float("inf") if self.end_s is None else self.end_s - 1e-6
        try:
            for packet in self._container.demux(self.audio):
                if packet.pts is not None and float(packet.pts * packet.time_base) >= end:
                    return  # one stream's packets come in time order
                if (kept := self._audio_in_range(packet, self.origin_s)) is not None:
                    yield kept
        except av.FFmpegError as exc:
            raise _fail(self.path, "reading the audio failed", exc) from exc

    def _seek(self) -> None:
        target = int(self.start_s / self.info.time_base)
        try:
            self._container.seek(target, stream=self.video, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            raise _fail(self.path, f"cannot seek to {self.start_s:g} s", exc) from exc

    def _audio_in_range(self, packet: av.Packet, origin_s: float) -> av.Packet | None:
        if packet.pts is None or packet.size == 0:
            return None
        tb = packet.time_base
        t = float(packet.pts * tb)
        # Without a start, everything before the end is kept (AAC priming has a negative pts).
        early = self.start_s > 0 and t < self.start_s - 1e-6
        if early or (self.end_s is not None and t >= self.end_s - 1e-6):
            return None
        if origin_s:
            shift = round(origin_s / tb)
            packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
        return packet

    def _frame(self, frame: av.VideoFrame, pts: int) -> Frame:
        rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8 RGB
        if rgb.shape[:2] != (self.info.height, self.info.width):
            raise _fail(
                self.path, f"frame size changed mid-stream to {rgb.shape[1]}x{rgb.shape[0]}"
            )
        return Frame(rgb, pts, int(frame.duration or 0), _display_matrix(frame))

    def _check_complete(self, decoded: int, last_s: float) -> None:
        """A stream cut short decodes without error; the container's own counts tell."""
        length = self.info.duration_s
        if decoded == 0 and length is not None and self.start_s >= length:
            raise _fail(
                self.path, f"the start, {self.start_s:g} s, is past the clip's end ({length:.1f} s)"
            )
        if decoded == 0:
            raise _fail(self.path, "no video frame could be decoded in the asked range")
        if self.start_s == 0.0 and self.end_s is None:
            self.check_whole(decoded, last_s)

    def check_whole(self, decoded: int, last_s: float) -> None:
        """Raise when `decoded` frames, the last at `last_s` s, fall short of the whole clip."""
        info = self.info
        # A frame or two of slack: AVI counts packets, and packed or empty ones decode to nothing.
        if info.frames and decoded < info.frames - max(2, info.frames // 100):
            raise _fail(self.path, f"truncated: {decoded} of {info.frames} frames could be decoded")
        slack = max(0.5, 3 / float(info.rate))  # audio may run a little past the video
        if info.duration_s and last_s < info.duration_s - slack:
            raise _fail(
                self.path,
                f"truncated: the video stops at {last_s:.2f} s of {info.duration_s:.2f} s",
            )

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    """The frame's rotation/flip as FFmpeg's 9 int32 display matrix, or None when absent."""
    # PyAV's stub types `side_data` as a TypedDict; a decoded frame holds a SideDataContainer.
    side_data = cast("SideDataContainer", frame.side_data)
    try:
        for data in side_data:
            if data.type.name == "DISPLAYMATRIX":
                raw = bytes(data)
                if len(raw) == 36:
                    return struct.unpack("<9i", raw)
    except (AttributeError, TypeError, ValueError):  # builds without side-data access
        return None
    return None


class VideoSink:
    """The output video, written to `<target>.partial<suffix>` and renamed on `commit()`.

    The video stream is created on the first frame (its display matrix must be known before
    the header is written); audio packets that arrive earlier are held until then.
    """

    def __init__(
        self,
        target: Path,
        info: VideoInfo,
        audio: AudioStream | None,
        *,
        codec: str | None = None,
        crf: int = DEFAULT_CRF,
    ) -> None:
        self.target = Path(target)
        self.partial = self.target.with_name(f".{self.target.stem}.partial{self.target.suffix}")
        self.info = info
        self.codec = codec or DEFAULT_CODECS.get(self.target.suffix.lower(), "libx264")
        self.crf = crf
        self._audio_in = audio
        self._pending_audio: list[av.Packet] = []
        self._container: av.container.OutputContainer | None = None
        self._video: VideoStream | None = None
        self._audio: AudioStream | None = None
        self.frames = 0

    def _open(self, first: Frame) -> None:
        try:
            self._container = av.open(str(self.partial), mode="w", format=muxer_name(self.target))
            self._video = self._add_video(first.rotation_matrix)
            if self._audio_in is not None:
                self._audio = self._container.add_stream_from_template(self._audio_in)
        except (av.FFmpegError, ValueError) as exc:
            self.abort()
            raise VideoEncodeError(
                f"{self.target}: cannot create the output: {_words(exc)}"
            ) from exc

    def _add_video(self, matrix: tuple[int, ...] | None) -> VideoStream:
        assert self._container is not None
        stream = self._container.add_stream(self.codec, rate=self.info.rate)
        if not isinstance(stream, VideoStream):
            raise ValueError(f"{self.codec!r} is not a video encoder")
        stream.width, stream.height = self.info.width, self.info.height
        stream.pix_fmt = "yuv420p"
        stream.time_base = self.info.time_base
        stream.codec_context.time_base = self.info.time_base
        stream.options = {"crf": str(self.crf)}
        if self.codec == "libvpx-vp9":
            stream.options |= {"b": "0", "row-mt": "1"}
        if matrix is not None:
            stream.set_display_matrix(list(matrix))
        return stream

    def write(self, frame: Frame) -> None:
        """Encode one (H, W, 3) uint8 RGB frame at its pts (the input's time base)."""
        if self._container is None:
            self._open(frame)
            for packet in self._pending_audio:
                self._mux_audio(packet)
            self._pending_audio.clear()
        out = av.VideoFrame.from_ndarray(frame.rgb, format="rgb24")
        out.pts = frame.pts
        out.time_base = self.info.time_base
        if frame.duration:
            out.duration = frame.duration
        self._encode(out)
        self.frames += 1

    def write_audio(self, packet: av.Packet) -> None:
        """Remux one audio packet unchanged (its bytes and timestamps)."""
        if self._container is None:
            self._pending_audio.append(packet)
        else:
            self._mux_audio(packet)

    def _mux_audio(self, packet: av.Packet) -> None:
        if self._audio is None:
            return
        packet.stream = self._audio
        self._mux([packet])

    def _encode(self, frame: av.VideoFrame | None) -> None:
        assert self._video is not None
        try:
            self._mux(self._video.encode(frame))
        except av.FFmpegError as exc:
            raise VideoEncodeError(f"{self.target}: encoding failed: {_words(exc)}") from exc

    def _mux(self, packets: list[av.Packet]) -> None:
        assert self._container is not None
        try:
            for packet in packets:
                self._container.mux(packet)
        except av.FFmpegError as exc:
            raise VideoEncodeError(f"{self.target}: writing failed: {_words(exc)}") from exc

    def commit(self, *, fsync: bool = False) -> Path:
        """Flush the encoder, close the file and rename it to the target; the target path.

        `fsync`: on disk before the rename, so a target that exists after a crash is whole.
        """
        if self._container is None:
            raise VideoEncodeError(f"{self.target}: no frame was written")
        self._encode(None)
        self._container.close()
        self._container = None
        if fsync:
            with self.partial.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(self.partial, self.target)
        return self.target

    def abort(self) -> None:
        """Drop everything written so far (the target is never touched)."""
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()


def muxer_name(path: Path) -> str | None:
    """FFmpeg's muxer for `path`'s suffix: named, so a temporary name can have any suffix."""
    return {".mkv": "matroska", ".webm": "webm", ".mov": "mov", ".mp4": "mp4", ".avi": "avi"}.get(
        path.suffix.lower()
    )
