"""Test clips made with PyAV from the real photos, and readers for what a clip holds."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

PHOTO = "images/gfpgan/whole_imgs/Blake_Lively.jpg"  # two faces, found by mobile0.25 at 256 px


def photo_frame(assets: Path, width: int = 256, name: str = PHOTO) -> np.ndarray:
    """The photo resized to `width` (even height), (H, W, 3) uint8 RGB."""
    bgr = cv2.imread(str(assets / name))
    assert bgr is not None, name
    height = int(round(bgr.shape[0] * width / bgr.shape[1] / 2) * 2)
    small = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small[..., ::-1])


def write_clip(
    path: Path,
    frames: Iterator[np.ndarray] | list[np.ndarray],
    *,
    fps: int = 25,
    audio: bool = True,
    rotation: int | None = None,
    codec: str = "libx264",
) -> None:
    """Encode RGB frames (and a 440 Hz AAC tone as long as the video) into `path`.

    Frames are encoded as they come: a generator of a long clip holds one frame at a time.
    """
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    count = 0
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": "20"}
        if rotation is not None:
            video.set_display_rotation(rotation)
        sound = None
        if audio:
            sound = out.add_stream("aac", rate=16000)
            sound.layout = "mono"
        for i, rgb in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            out.mux(video.encode(frame))
            count += 1
        out.mux(video.encode(None))
        if sound is not None:
            samples = int(16000 * count / fps)
            t = np.arange(samples) / 16000
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for lo in range(0, samples, 1024):
                chunk = tone[None, lo : lo + 1024]
                block = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                block.sample_rate, block.pts = 16000, lo
                out.mux(sound.encode(block))
            out.mux(sound.encode(None))


@dataclass
class ClipFacts:
    """What the tests compare between input and output."""

    frames: int
    rate: Fraction
    time_base: Fraction
    width: int
    height: int
    duration_s: float
    video_pts: list[int]
    audio_packets: list[bytes]
    audio_times: list[float]  # each audio packet's pts in seconds
    rotation: int | None


def clip_facts(path: Path) -> ClipFacts:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        rate, tb = Fraction(video.average_rate), Fraction(video.time_base)
        width, height = video.codec_context.width, video.codec_context.height
        duration = container.duration / av.time_base if container.duration else 0.0
        audio = container.streams.audio[0] if container.streams.audio else None
        pts, packets, times, rotation = [], [], [], None
        for packet in container.demux(*[s for s in (video, audio) if s is not None]):
            if packet.stream is audio:
                if packet.size:
                    packets.append(bytes(packet))
                    times.append(float(packet.pts * packet.time_base))
                continue
            for frame in packet.decode():
                pts.append(frame.pts)
                rotation = frame.rotation if rotation is None else rotation
    return ClipFacts(len(pts), rate, tb, width, height, duration, pts, packets, times, rotation)


def decoded_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a (short) clip, (H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def gradient_frames(count: int, width: int = 128, height: int = 96) -> Iterator[np.ndarray]:
    """A bright band moving across a gradient: compresses well, detection runs in full."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    for i in range(count):
        band = 80.0 * np.exp(-(((np.arange(width) - (i * 3) % width) / 8.0) ** 2))
        frame = 0.5 * x + 0.3 * y + band[None, :, None]
        yield np.clip(np.broadcast_to(frame, (height, width, 3)), 0, 255).astype(np.uint8)
