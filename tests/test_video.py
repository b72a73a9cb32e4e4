"""Video in, video out: the real CLI on a clip made from the real photos, tracking, bad input.

Clips are small (256x170, a few dozen frames) and the weights tiny; the real mobile0.25
RetinaFace finds the faces. References are independent of the code under test: the input
clip's own packets, timestamps and pixels, read back with PyAV.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import torch

from model.errors import NoVideoStreamError, UnsupportedVideoCodecError, VideoDecodeError
from model.media.faces.align import align_face
from model.media.faces.detect import FaceDetector, select_faces
from model.media.video.io import VideoSource
from model.media.video.restore import VideoOptions, restore_video
from model.media.video.track import FaceTracker, OneEuroFilter, SmoothingConfig, box_iou
from tests.video_helpers import clip_facts, decoded_frames, photo_frame, write_clip

REPO = Path(__file__).resolve().parents[1]
FRAMES = 12  # two faces each: 24 faces, 3 restorer calls of 8


def noisy_copies(rgb: np.ndarray, count: int, seed: int = 0) -> list[np.ndarray]:
    """A still scene: the same photo with +-2 levels of fresh noise per frame (sensor noise)."""
    rng = np.random.default_rng(seed)
    noise = [rng.integers(-2, 3, rgb.shape) for _ in range(count)]
    return [np.clip(rgb.astype(np.int16) + n, 0, 255).astype(np.uint8) for n in noise]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    # `assets`: the detector file is linked from there; without it, skip rather than error.
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25", torch.device("cpu"))


@pytest.fixture(scope="module")
def still_clip(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    path = tmp_path_factory.mktemp("clips") / "still.mp4"
    write_clip(path, noisy_copies(photo_frame(assets), FRAMES), fps=25, rotation=90)
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights_dir: Path, still_clip: Path):
    """One real `osdface restore` over a folder: the clip, a photo, and a truncated clip."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "clip.mp4").write_bytes(still_clip.read_bytes())
    data = still_clip.read_bytes()
    (folder / "broken.mp4").write_bytes(data[: len(data) // 2])
    first = decoded_frames(still_clip)[0]
    cv2.imwrite(str(folder / "photo.png"), first[..., ::-1])  # BGR for cv2
    out = tmp_path_factory.mktemp("out")
    command = [sys.executable, "-m", "osdface", "restore", str(folder), "-o", str(out)]
    command += ["--weights", str(tiny_weights_dir), "--detector", "retinaface_mobile0.25"]
    command += ["--device", "cpu", "--batch-size", "8", "--crf", "12"]
    command += ["--report", str(report_of(folder))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    return folder, out, result


def report_of(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}-report.jsonl")


def test_cli_counts_a_videos_frames_and_faces_in_its_line_summary_and_report(cli_run) -> None:
    folder, _, result = cli_run
    line = re.search(r"clip\.mp4: (\d+) frames, (\d+) faces, [\d.]+ frames/s -> ", result.stderr)
    assert line, result.stderr[-3000:]
    assert line.groups() == (str(FRAMES), str(2 * FRAMES))
    lines = report_of(folder).read_text().splitlines()
    records = {Path(r["input"]).name: r for r in map(json.loads, lines)}
    clip, photo = records["clip.mp4"], records["photo.png"]
    assert (clip["frames"], clip["face_count"], clip["faces"]) == (FRAMES, 2 * FRAMES, [])
    assert photo["frames"] is None and photo["face_count"] == len(photo["faces"]) == 2
    restored, faces = map(
        int, re.findall(r"(\d+) files? restored, (\d+) faces?", result.stderr)[-1]
    )
    assert (restored, faces) == (2, 2 * FRAMES + 2)  # the clip's faces counted, per-face time too
    (failure,) = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert failure.count("broken.mp4") == 1 and "[Errno" not in failure, failure


def test_cli_keeps_frames_rate_size_duration_audio_and_rotation(cli_run, still_clip) -> None:
    _, out, result = cli_run
    assert (out / "clip.mp4").is_file(), result.stderr[-3000:]
    src, dst = clip_facts(still_clip), clip_facts(out / "clip.mp4")
    assert dst.frames == src.frames == FRAMES
    assert (dst.rate, dst.width, dst.height) == (src.rate, src.width, src.height)
    assert dst.time_base == src.time_base and dst.video_pts == src.video_pts
    assert dst.duration_s == pytest.approx(src.duration_s, abs=1e-3)
    assert src.audio_packets and dst.audio_packets == src.audio_packets  # bytes equal
    assert src.rotation == dst.rotation == 90


def test_cli_restores_faces_in_every_frame_and_leaves_the_rest(cli_run, detector) -> None:
    folder, out, _ = cli_run
    before = decoded_frames(folder / "clip.mp4")
    after = decoded_frames(out / "clip.mp4")
    for k, (src, dst) in enumerate(zip(before, after, strict=True)):
        faces = detector.detect(src)
        assert len(faces) == 2, f"frame {k}: the clip has two faces"
        far = np.ones(src.shape[:2], bool)
        for face in faces:
            x1, y1, x2, y2 = (round(v) for v in face.box)
            inner = (slice(y1 + 4, y2 - 4), slice(x1 + 4, x2 - 4))
            diff = np.abs(src[inner].astype(int) - dst[inner].astype(int)).mean()
            assert diff > 8, f"frame {k}: face {face.box} not restored (mean diff {diff:.1f})"
            w, h = x2 - x1, y2 - y1
            far[max(0, y1 - 2 * h) : y2 + 2 * h, max(0, x1 - 2 * w) : x2 + 2 * w] = False
        if far.any():  # re-encoding at CRF 12 moves far pixels by a level or two, no more
            rest = np.abs(src[far].astype(int) - dst[far].astype(int)).mean()
            assert rest < 3, f"frame {k}: pixels far from faces changed by {rest:.1f}"


def test_cli_mixed_folder_one_bad_file_does_not_stop_the_others(cli_run) -> None:
    folder, out, result = cli_run
    assert result.returncode == 1, "a failed file makes the exit code non-zero"
    assert (out / "clip.mp4").is_file() and (out / "photo.png").is_file()
    assert not (out / "broken.mp4").exists()
    assert not [p for p in out.iterdir() if "partial" in p.name], "no half-written file"
    assert "broken.mp4" in result.stderr
    assert (folder / "clip.mp4").read_bytes()[:4], "inputs untouched"


def test_still_face_crops_do_not_move(still_clip, detector) -> None:
    """Real detections on a still clip: smoothed crops are identical; raw ones jitter."""
    frames = decoded_frames(still_clip)

    def affines(smoothing: SmoothingConfig) -> np.ndarray:
        tracker, out = FaceTracker(smoothing), []
        for rgb in frames:
            faces = select_faces(detector.detect(rgb), rgb.shape[1], rgb.shape[0])
            tracked = sorted(tracker.update(faces), key=lambda t: t.track_id)
            out.append([align_face(rgb, t.landmarks)[1] for t in tracked])
        return np.array(out)  # (frames, faces, 2, 3)

    smooth, raw = affines(SmoothingConfig()), affines(SmoothingConfig(enabled=False))
    assert np.abs(np.diff(smooth, axis=0)).max() == 0.0, "a still face's crop moved"
    assert np.abs(np.diff(raw, axis=0)).max() > 0.0, "raw landmarks jitter (test is sensitive)"


def test_one_euro_still_noise_held_and_motion_followed() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(100, 170, (5, 2))
    still = OneEuroFilter(SmoothingConfig())
    held = [still(base + rng.normal(0, 0.3, (5, 2)), 70.0) for _ in range(60)]
    assert np.abs(np.diff(held[5:], axis=0)).max() == 0.0
    assert np.abs(held[-1] - base).max() < 1.0
    for speed in (0.5, 2.0, 6.0):  # pixels per frame
        moving, lags = OneEuroFilter(SmoothingConfig()), []
        for t in range(60):
            true = base + np.array([speed * t, 0.0])
            lags.append((true - moving(true + rng.normal(0, 0.3, (5, 2)), 70.0))[:, 0].mean())
        assert np.mean(lags[20:]) / speed < 2.0, f"lag over 2 frames at {speed} px/frame"


def test_tracker_keeps_ids_across_order_changes_and_drops_lost_faces() -> None:
    from model.media.faces.detect import DetectedFace

    def face(x: float) -> DetectedFace:
        points = tuple(
            (x + dx, 50.0 + dy) for dx, dy in ((10, 10), (30, 10), (20, 20), (12, 30), (28, 30))
        )
        return DetectedFace((x, 40.0, x + 40, 90.0), points, 0.99)

    tracker = FaceTracker(SmoothingConfig(max_missed=2))
    a, b = tracker.update([face(0), face(100)])
    swapped = tracker.update([face(102), face(1)])
    assert [t.track_id for t in swapped] == [b.track_id, a.track_id]
    for _ in range(3):
        tracker.update([face(103)])
    assert [t.id for t in tracker.tracks] == [b.track_id]
    assert tracker.update([face(0)])[0].track_id not in (a.track_id, b.track_id)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_start_and_duration_cut_video_and_audio(tmp_path: Path, detector) -> None:
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(50)]
    src = tmp_path / "noise.mkv"
    write_clip(src, frames, fps=25)
    options = VideoOptions(start_s=0.4, duration_s=0.8)
    result = restore_video(src, tmp_path / "out.mkv", detector, _never, options)
    facts = clip_facts(result.path)
    assert result.frames == facts.frames == 20
    assert facts.video_pts[0] == 0, "the piece starts at time 0"
    full = clip_facts(src)
    pairs = zip(full.audio_packets, full.audio_times, strict=True)
    inside = [(p, t) for p, t in pairs if 0.4 <= t < 1.2]
    assert facts.audio_packets == [p for p, _ in inside], "the range's packets, unchanged"
    assert facts.audio_times[0] == pytest.approx(inside[0][1] - 0.4, abs=1e-3), "shifted"


def _never(crops: torch.Tensor) -> torch.Tensor:
    raise AssertionError("no face, so the restorer must not be called")


def test_bad_inputs_raise_specific_errors_naming_the_file(tmp_path: Path, still_clip) -> None:
    data = still_clip.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(1000))
    audio_only = tmp_path / "audio.mp4"
    _write_audio_only(audio_only)
    lossless = tmp_path / "ffv1.mkv"
    write_clip(lossless, [np.zeros((32, 32, 3), np.uint8)] * 3, audio=False, codec="ffv1")
    cases = [
        (truncated, VideoDecodeError),
        (garbage, VideoDecodeError),
        (audio_only, NoVideoStreamError),
        (lossless, UnsupportedVideoCodecError),
    ]
    for path, error in cases:
        target = tmp_path / f"out-{path.name}"
        with pytest.raises(error, match=path.name):
            restore_video(path, target, None, _never, VideoOptions())  # type: ignore[arg-type]
        assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def _write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        block = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        block.sample_rate, block.pts = 16000, 0
        out.mux(stream.encode(block))
        out.mux(stream.encode(None))


def test_memory_stays_flat_on_a_long_clip(tmp_path: Path, detector) -> None:
    """2,000 tiny frames through the real streaming path: RSS does not grow with length."""
    rng = np.random.default_rng(3)
    # 128x160: holding every frame would add 1,600 x 60 KiB = 94 MiB. The bound is well under
    # that and over the allocator's own drift after the module's other tests (up to 25 MiB).
    frame = rng.integers(0, 255, (128, 160, 3), dtype=np.uint8)
    src = tmp_path / "long.mp4"
    write_clip(src, (np.roll(frame, k, axis=1) for k in range(2000)), fps=50)
    process, samples = psutil.Process(), []

    def progress(p) -> None:
        samples.append((p.frames, process.memory_info().rss))

    options = VideoOptions(window_frames=16)
    result = restore_video(src, tmp_path / "out.mp4", detector, _never, options, progress=progress)
    assert result.frames == 2000
    settled = [rss for frames, rss in samples if frames >= 400]
    growth = (max(settled) - settled[0]) / 2**20
    print(f"RSS {settled[0] / 2**20:.0f} MiB at frame 400, growth to 2000: {growth:.1f} MiB")
    assert growth < 40, f"RSS grew {growth:.1f} MiB from frame 400 to 2000"
    with VideoSource(result.path) as source:
        assert source.info.frames == 2000


@pytest.mark.parametrize(
    ("suffix", "video_codec", "audio_codec"),
    [
        (".webm", "libvpx-vp9", "libopus"),
        (".avi", "mpeg4", "libmp3lame"),
        (".mov", "libx264", "aac"),
    ],
)
def test_other_containers_keep_frames_rate_and_audio(
    tmp_path: Path, detector, suffix: str, video_codec: str, audio_codec: str
) -> None:
    import av

    src = tmp_path / f"in{suffix}"
    rng = np.random.default_rng(4)
    with av.open(str(src), "w") as out:
        video = out.add_stream(video_codec, rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream(audio_codec, rate=48000)
        sound.layout = "mono"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), np.uint8))
            frame.pts, frame.time_base = i, Fraction(1, 25)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        sample_format = sound.codec_context.codec.audio_formats[0].name
        for lo in range(0, 48000 * 10 // 25, 960):
            block = av.AudioFrame(format=sample_format, layout="mono", samples=960)
            for plane in block.planes:
                plane.update(bytes(plane.buffer_size))
            block.sample_rate, block.pts = 48000, lo
            out.mux(sound.encode(block))
        out.mux(sound.encode(None))
    result = restore_video(src, tmp_path / f"out{suffix}", detector, _never, VideoOptions())
    before, after = clip_facts(src), clip_facts(result.path)
    assert after.frames == before.frames == 10
    assert (after.rate, after.time_base, after.width) == (before.rate, before.time_base, 64)
    assert after.audio_packets == before.audio_packets and before.audio_packets


def test_cli_refuses_bad_video_flags_before_loading_weights(
    tmp_path: Path, still_clip, caplog: pytest.LogCaptureFixture
) -> None:
    from osdface.cli import main

    missing = tmp_path / "no-weights"
    argv = ["restore", str(still_clip), "-o", str(tmp_path / "out"), "--weights", str(missing)]
    assert main([*argv, "--crf", "99", "--device", "cpu"]) == 2  # a usage error: nothing ran
    assert "crf must be" in caplog.text and "no-weights" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_moving_face_is_followed_without_lag(assets: Path, detector, tmp_path: Path) -> None:
    """Real detections on a clip panning 2 px per frame: smoothed landmarks trail the raw ones
    by under two frames, and the crop moves with the face."""
    rgb = photo_frame(assets)
    src = tmp_path / "pan.mp4"
    write_clip(src, [np.roll(rgb, 2 * k, axis=1) for k in range(15)], fps=25, audio=False)
    tracker, lags, centres = FaceTracker(), [], []
    for k, frame in enumerate(decoded_frames(src)):
        faces = select_faces(detector.detect(frame), frame.shape[1], frame.shape[0])
        for tracked in tracker.update(faces):
            lag = tracked.face.landmarks_array()[:, 0].mean() - tracked.landmarks[:, 0].mean()
            if k >= 5:
                lags.append(lag / 2.0)  # in frames at 2 px per frame
            if tracked.track_id == 0:
                centres.append(tracked.landmarks[:, 0].mean())
    print(f"mean lag {np.mean(lags):.2f} frames, max {max(lags):.2f}")
    assert len(lags) == 2 * 10, "both faces tracked in every frame"
    assert np.mean(lags) < 2.0 and max(lags) < 3.0, f"lag {np.mean(lags):.2f} frames"
    assert centres[-1] - centres[0] > 20, "the crop follows the face"
