"""A range of a video restored as segments, then joined: the same video as one pass, remuxed.

Clips are small synthetic encodes made with PyAV (64x48 to 160x120, a few dozen frames, short
key-frame intervals and B-frames, some with an AAC track, one with a variable frame rate). The
plumbing tests use a detector that finds nothing; the smoothing test a real (if simple)
detector of a bright textured square, with a restorer that returns its crops as they came.
References are independent of the code under test: the single-pass `restore_video` output,
the input's own frames and timestamps, the segment files' packets, read back with PyAV.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from model.errors import InvalidInputError, VideoCancelledError, VideoDecodeError, VideoEncodeError
from model.media.faces.detect import DetectedFace
from model.media.video.io import VideoInfo, VideoSource
from model.media.video.restore import VideoOptions, restore_video
from model.media.video.segments import (
    Segment,
    join_segments,
    plan_segments,
    restore_segment,
    segment_suffix,
)
from tests.video_helpers import clip_facts, decoded_frames, write_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NoFaces:
    """A detector that finds nothing: the video plumbing alone."""

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        return []


class SquareDetector:
    """The bright square of `moving_square_frames` as a face: its box, and five face-like
    landmarks placed from its intensity-weighted centre (so they jitter with the pixels)."""

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        gray = rgb.astype(np.float64).mean(axis=2)
        ys, xs = np.nonzero(gray > 140)
        if len(xs) < 50:
            return []
        weight = gray[ys, xs]
        cx, cy = (xs * weight).sum() / weight.sum(), (ys * weight).sum() / weight.sum()
        side = float(np.sqrt(len(xs)))
        layout = ((-0.2, -0.1), (0.2, -0.1), (0.0, 0.05), (-0.15, 0.25), (0.15, 0.25))
        points = tuple((cx + side * dx, cy + side * dy) for dx, dy in layout)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        return [DetectedFace(box, points, 0.99)]


def _never(crops: torch.Tensor) -> torch.Tensor:
    raise AssertionError("no face, so the restorer must not be called")


def noise_frames(count: int, seed: int = 0, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    """Distinct frames: one noise image rolled a pixel further each frame."""
    base = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return [np.roll(base, k, axis=1) for k in range(count)]


def write_encoded(
    path: Path,
    frames: list[np.ndarray],
    *,
    codec: str = "libx264",
    times_ms: list[int] | None = None,
    audio: bool = False,
) -> None:
    """A key frame every 6 frames (so segments start between key frames), B-frames where the
    codec has them; 25 fps, or each frame at its own time in ms; an AAC tone as long."""
    height, width = frames[0].shape[:2]
    tb = Fraction(1, 25) if times_ms is None else Fraction(1, 1000)
    times = list(range(len(frames))) if times_ms is None else [int(t) for t in times_ms]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = tb
        stream.options = {"g": "6", "crf": "20"} | ({"b": "0"} if codec == "libvpx-vp9" else {})
        sound = out.add_stream("aac", rate=16000) if audio else None
        for rgb, t in zip(frames, times, strict=True):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, tb
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if sound is not None:
            _write_tone(out, sound, float((times[-1] + 1) * tb))


def _write_tone(out: av.container.OutputContainer, sound, seconds: float) -> None:
    samples = int(16000 * seconds)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)
    for lo in range(0, samples, 1024):
        block = av.AudioFrame.from_ndarray(tone[None, lo : lo + 1024], format="fltp", layout="mono")
        block.sample_rate, block.pts = 16000, lo
        out.mux(sound.encode(block))
    out.mux(sound.encode(None))


def info_of(path: Path) -> VideoInfo:
    with VideoSource(path) as source:
        return source.info


def frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [float(f.pts * stream.time_base) for f in container.decode(stream)]


def run_segments(
    src: Path,
    folder: Path,
    options: VideoOptions,
    segment_frames: int,
    detector=None,
    restore_fn=_never,
    **kwargs,
):
    """Every segment restored into `folder`, in reverse order (any order must do); the plan,
    the segment paths and the results, in plan order."""
    folder.mkdir(exist_ok=True)
    segments = plan_segments(info_of(src), options, segment_frames)
    paths = [folder / f"{s.index:03d}{segment_suffix(src)}" for s in segments]
    results = {}
    for segment, path in reversed(list(zip(segments, paths, strict=True))):
        detect = detector or NoFaces()
        results[segment.index] = restore_segment(
            src, path, detect, restore_fn, options, segment, **kwargs
        )
    return segments, paths, [results[s.index] for s in segments]


def video_packets(path: Path) -> list[av.Packet]:
    with av.open(str(path)) as container:
        return [p for p in container.demux(video=0) if p.size]


CASES = {
    # name: (suffix, video codec, frames, audio, options, segment frames)
    "mp4, 45 frames in segments of 8, audio": (
        ".mp4",
        "libx264",
        45,
        True,
        VideoOptions(window_frames=4),
        8,
    ),
    "mkv, start and duration, audio": (
        ".mkv",
        "libx264",
        50,
        True,
        VideoOptions(window_frames=4, start_s=0.3, duration_s=1.1),
        8,
    ),
    "webm, VP9": (".webm", "libvpx-vp9", 30, False, VideoOptions(window_frames=4), 12),
    "avi, MPEG-4 in, x264 out": (".avi", "mpeg4", 30, False, VideoOptions(window_frames=8), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_joined_segments_are_the_single_pass_video(tmp_path: Path, case: str) -> None:
    suffix, codec, count, audio, options, segment_frames = CASES[case]
    src = tmp_path / f"in{suffix}"
    write_encoded(src, noise_frames(count), codec=codec, audio=audio)
    single = restore_video(src, tmp_path / f"single{suffix}", NoFaces(), _never, options)
    segments, paths, results = run_segments(src, tmp_path / "parts", options, segment_frames)
    assert len(segments) > 2, "the clip is cut in several segments"
    joined = join_segments(paths, src, tmp_path / f"joined{suffix}", options)

    one, cut = clip_facts(single.path), clip_facts(joined.path)
    assert sum(r.frames for r in results) == joined.frames == cut.frames == single.frames
    if suffix != ".avi":  # AVI stores no presentation times: the decoder guesses them
        assert cut.video_pts == one.video_pts, "the same timeline, frame for frame"
    assert (cut.rate, cut.time_base, cut.width) == (one.rate, one.time_base, one.width)
    assert cut.duration_s == pytest.approx(one.duration_s, abs=0.05)
    assert cut.audio_packets == one.audio_packets, "the range's audio, as restore_video keeps it"
    if audio:
        assert cut.audio_packets and cut.audio_times[-1] == pytest.approx(
            one.audio_times[-1], abs=0.07
        )
    # In order, none lost or doubled: each output frame is nearest its own input frame.
    first = math.ceil(options.start_s * 25 - 1e-6)
    inputs = np.stack(decoded_frames(src)[first : first + cut.frames]).astype(np.float32)
    for k, rgb in enumerate(decoded_frames(joined.path)):
        errors = np.abs(inputs - rgb.astype(np.float32)).mean(axis=(1, 2, 3))
        assert errors.argmin() == k, f"output frame {k} is input frame {errors.argmin()}"
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_joined_video_is_a_remux_of_the_segments(tmp_path: Path) -> None:
    src = tmp_path / "in.mp4"
    write_clip(src, noise_frames(40, seed=1), fps=25, rotation=90)
    options = VideoOptions(window_frames=8)
    _, paths, _ = run_segments(src, tmp_path / "parts", options, 16)
    joined = join_segments(paths, src, tmp_path / "joined.mp4", options)
    parts = [video_packets(p) for p in paths]
    out = video_packets(joined.path)
    assert [bytes(p) for p in out] == [bytes(p) for part in parts for p in part], "no re-encode"
    starts = np.cumsum([0] + [len(part) for part in parts[:-1]])
    assert all(out[i].is_keyframe for i in starts), "each segment starts on a key frame"
    dts = [p.dts for p in out]
    assert all(a < b for a, b in itertools.pairwise(dts)), "decode times rise"
    assert all(p.dts <= p.pts for p in out)
    assert clip_facts(joined.path).rotation == clip_facts(src).rotation == 90


def test_every_frame_falls_in_exactly_one_segment(tmp_path: Path) -> None:
    """Constant and variable frame rates, ranges that do and do not start at 0: the segments
    partition the frames by time, and restoring them writes each frame once."""
    rng = np.random.default_rng(7)
    steps = rng.choice([20, 33, 40, 70], size=59).tolist()
    steps[30] = 900  # a pause longer than a segment: at least one segment holds no frame
    vfr = tmp_path / "vfr.mkv"
    write_encoded(vfr, noise_frames(60, seed=2), times_ms=np.cumsum([0, *steps]).tolist())
    cfr = tmp_path / "cfr.mp4"
    write_encoded(cfr, noise_frames(37, seed=3), audio=True)
    cases = [
        (cfr, VideoOptions(window_frames=4), 8),
        (cfr, VideoOptions(window_frames=4, start_s=0.25, duration_s=0.7), 4),
        (vfr, VideoOptions(window_frames=4), 8),
        (vfr, VideoOptions(window_frames=2, start_s=0.5), 6),
    ]
    for src, options, segment_frames in cases:
        segments = plan_segments(info_of(src), options, segment_frames)
        start = options.start_s
        end = np.inf if options.duration_s is None else start + options.duration_s
        kept = [t for t in frame_times(src) if start - 1e-6 <= t < end - 1e-6]
        for t in kept:
            assert sum(s.holds(t) for s in segments) == 1, f"{src.name} {options}: {t} s"
        assert segments[0].start_s == start
        assert segments[-1].end_s == (None if options.duration_s is None else end)

        folder = tmp_path / f"parts-{src.stem}-{segment_frames}-{start}"
        _, paths, results = run_segments(src, folder, options, segment_frames)
        assert [r.frames for r in results] == [sum(s.holds(t) for t in kept) for s in segments]
        assert sum(r.frames for r in results) == len(kept)
        joined = join_segments(paths, src, folder / f"joined{src.suffix}", options)
        single = restore_video(src, folder / f"single{src.suffix}", NoFaces(), _never, options)
        assert joined.frames == single.frames == len(kept)
        assert clip_facts(joined.path).video_pts == clip_facts(single.path).video_pts
        if src is vfr and start == 0:
            empty = [p for p, r in zip(paths, results, strict=True) if r.frames == 0]
            assert empty and all(p.stat().st_size == 0 for p in empty), "empty, yet complete"
            assert joined.segments == len(paths) - len(empty)


def test_plan_rejects_segments_of_part_windows_and_a_clip_without_length() -> None:
    info = VideoInfo(64, 48, Fraction(25), Fraction(1, 25), 0, None, "h264", False)
    with pytest.raises(InvalidInputError, match="multiple of window_frames"):
        plan_segments(info, VideoOptions(window_frames=8), 12)
    only = plan_segments(info, VideoOptions(window_frames=8, start_s=1.0), 16)
    assert only == [Segment(0, 1.0, None)], "no length known: one segment to the end"
    known = VideoInfo(64, 48, Fraction(25), Fraction(1, 25), 0, 2.0, "h264", False, 0.0, 2.0)
    plan = plan_segments(known, VideoOptions(window_frames=8), 16)
    assert [(s.start_s, s.end_s) for s in plan] == [(0.0, 0.64), (0.64, 1.28), (1.28, None)]
    again = plan_segments(known, VideoOptions(window_frames=8), 16)
    assert plan == again, "one file, one plan, on every machine"


def moving_square_frames(count: int, seed: int = 5) -> list[np.ndarray]:
    """A textured bright square drifting 1.5 px per frame with +-1 px of shake."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(150, 256, (40, 40, 3), dtype=np.uint8)
    frames = []
    for k in range(count):
        rgb = rng.integers(0, 100, (120, 160, 3), dtype=np.uint8)
        x, y = round(20 + 1.5 * k + rng.normal(0, 1.0)), round(40 + rng.normal(0, 1.0))
        rgb[y : y + 40, x : x + 40] = texture
        frames.append(rgb)
    return frames


def test_smoothing_carries_over_a_segment_boundary(tmp_path: Path) -> None:
    """The crop a segment's first frame is aligned with (its smoothed landmarks made visible)
    matches the single pass's when the tracker warmed up on the frames before; a cold start
    aligns on the raw detection and lands visibly elsewhere."""
    src = tmp_path / "square.mp4"
    write_clip(src, moving_square_frames(40), fps=25, audio=False)
    options = VideoOptions(window_frames=8, batch_faces=8)

    def recorder(store: list[torch.Tensor]):
        def restore(crops: torch.Tensor) -> torch.Tensor:
            store.extend(crop.clone() for crop in crops)
            return crops

        return restore

    single: list[torch.Tensor] = []
    restore_video(src, tmp_path / "single.mp4", SquareDetector(), recorder(single), options)
    assert len(single) == 40, "the square is found in every frame"
    segment = plan_segments(info_of(src), options, 24)[1]
    boundary = 24
    gaps = {}
    for overlap in (0, 16):
        crops: list[torch.Tensor] = []
        result = restore_segment(
            src,
            tmp_path / f"seg-{overlap}.mp4",
            SquareDetector(),
            recorder(crops),
            options,
            segment,
            overlap_frames=overlap,
        )
        assert result.frames == result.faces == len(crops) == 40 - boundary, "warm-up: no crop"
        gaps[overlap] = float((crops[0] - single[boundary]).abs().mean())
    print(f"boundary crop vs single pass: cold {gaps[0]:.4f}, warmed {gaps[16]:.4f}")
    assert gaps[0] > 0.02, "a cold start is far off (the test can tell)"
    assert gaps[16] < 0.2 * gaps[0] and gaps[16] < 0.005


def test_cancel_leaves_nothing_and_a_redo_replaces_the_file_whole(tmp_path: Path) -> None:
    """Cancelled once its file is being written (x264 writes only after ~40 frames of
    look-ahead): nothing left; a finished segment redone is replaced only when complete."""
    src = tmp_path / "in.mp4"
    write_encoded(src, noise_frames(100, seed=4), audio=True)
    options = VideoOptions(window_frames=4)
    segment = plan_segments(info_of(src), options, 64)[0]
    path = tmp_path / "parts" / "000.mp4"
    path.parent.mkdir()

    def writing() -> bool:
        return any("partial" in p.name for p in path.parent.iterdir())

    def cancelled() -> None:
        with pytest.raises(VideoCancelledError, match=src.name):
            restore_segment(src, path, NoFaces(), _never, options, segment, should_stop=writing)

    cancelled()
    assert list(path.parent.iterdir()) == [], "no segment file, no partial file"

    first = restore_segment(src, path, NoFaces(), _never, options, segment)
    before = path.read_bytes()
    cancelled()
    assert path.read_bytes() == before, "a cancelled redo leaves the finished segment alone"
    assert list(path.parent.iterdir()) == [path]

    other = VideoOptions(window_frames=4, crf=40)
    redo = restore_segment(src, path, NoFaces(), _never, other, segment)
    assert redo.frames == first.frames == 64
    assert path.read_bytes() != before and len(video_packets(path)) == 64, "replaced, whole"
    assert list(path.parent.iterdir()) == [path]


def test_join_refuses_missing_out_of_order_and_short_segments(tmp_path: Path) -> None:
    src = tmp_path / "in.mkv"
    write_clip(src, noise_frames(36, seed=6), fps=25)
    options = VideoOptions(window_frames=4)
    _, paths, _ = run_segments(src, tmp_path / "parts", options, 12)
    target = tmp_path / "out.mkv"
    with pytest.raises(VideoEncodeError, match="missing"):
        join_segments([*paths, tmp_path / "parts" / "999.mkv"], src, target, options)
    with pytest.raises(VideoEncodeError, match="overlaps"):
        join_segments(paths[::-1], src, target, options)
    with pytest.raises(VideoDecodeError, match="truncated"):
        join_segments(paths[:-1], src, target, options)  # a whole clip, its end missing
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
