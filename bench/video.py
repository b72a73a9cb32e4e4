"""Video restore speed: frames per second through `model.media.video.restore_video`, batching the
faces of many frames per restorer call against one call per frame.

The clip is made from a real photo of the test assets (two faces), resized to `--size` pixels
wide, drifting a pixel per frame, with an AAC track; it runs through the whole path: decode,
RetinaFace mobile0.25, tracking and smoothing, alignment, the restorer, paste-back, x264 encode,
audio remux. Prints a markdown table; `--results FILE` appends it with date, machine, command.

    python -m bench.video --tiny --device cpu --frames 24 --results bench/RESULTS.md
    python -m bench.video --weights-dir ./osdface-weights --device cuda --frames 120
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.fullsize import ensure_weights
from model.device import resolve_device, resolve_dtype
from model.media.faces.detect import FaceDetector
from model.media.video.restore import VideoOptions, restore_video
from model.networks.restorer import OSDFaceRestorer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = Path(os.environ.get("OSDFACE_TEST_ASSETS", REPO.parent / "shared" / "assets"))
PHOTO = "images/gfpgan/whole_imgs/Blake_Lively.jpg"
DETECTOR = "detection_mobilenet0.25_Final.pth"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random weights (CPU timing)")
    p.add_argument("--weights-dir", type=Path, default=None, help="weights (default: temp)")
    p.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--size", type=int, default=512, help="clip width in pixels")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--batch-faces", type=int, default=8, help="faces per call when batching")
    p.add_argument("--window-frames", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; median reported")
    p.add_argument("--results", type=Path, default=None, help="append the table to this file")
    p.add_argument("--note", default="", help="a line printed under the table")
    return p.parse_args(argv)


def make_clip(path: Path, assets: Path, width: int, frames: int, fps: int = 25) -> None:
    """The photo at `width`, drifting 1 px per frame, with a tone as long as the video."""
    from tests.video_helpers import photo_frame, write_clip

    rgb = photo_frame(assets, width, PHOTO)
    write_clip(path, (np.roll(rgb, i, axis=1) for i in range(frames)), fps=fps)


@dataclass
class Run:
    mode: str
    frames: int
    faces: int
    calls: int
    seconds: float
    model_s: float

    def row(self) -> str:
        fps = self.frames / self.seconds
        faces_s = self.faces / self.model_s if self.model_s else 0.0
        rest = (self.seconds - self.model_s) / self.frames * 1000
        return (
            f"| {self.mode} | {self.frames} | {self.faces} | {self.calls} | "
            f"{self.faces / max(self.calls, 1):.1f} | {self.seconds:.1f} | **{fps:.2f}** | "
            f"{self.model_s:.1f} | {faces_s:.2f} | {rest:.0f} |"
        )


def run(mode: str, clip: Path, out: Path, detector, restorer, options: VideoOptions) -> Run:
    model_s = 0.0

    def restore_fn(crops: torch.Tensor) -> torch.Tensor:
        nonlocal model_s
        start = time.perf_counter()
        images = restorer(crops).images
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        model_s += time.perf_counter() - start
        return images

    out.unlink(missing_ok=True)
    result = restore_video(clip, out, detector, restore_fn, options)
    return Run(mode, result.frames, result.faces, result.restorer_calls, result.seconds, model_s)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # the command, as recorded
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="osdface-bench-video-"))
    weights = args.weights_dir or ensure_weights(work / "weights", tiny=args.tiny)
    facexlib = weights / "facexlib"
    if not (facexlib / DETECTOR).exists():
        facexlib.mkdir(parents=True, exist_ok=True)
        (facexlib / DETECTOR).symlink_to((args.assets / "detectors" / DETECTOR).resolve())
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    restorer = OSDFaceRestorer.from_pretrained(weights, device, dtype)
    detector = FaceDetector.load(weights, "retinaface_mobile0.25", device)
    clip = work / "clip.mp4"
    make_clip(clip, args.assets, args.size, args.frames)
    restorer(torch.rand(1, 3, 512, 512))  # warm-up outside the timings
    batched = VideoOptions(batch_faces=args.batch_faces, window_frames=args.window_frames)
    per_frame = VideoOptions(batch_faces=64, window_frames=1)  # one call per frame
    modes = {"one frame per call": per_frame, f"batched ({args.batch_faces} faces/call)": batched}
    # Rounds alternate the modes, so a shared machine's changing load hits both alike.
    done: dict[str, list[Run]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, options in modes.items():
            done[name].append(run(name, clip, work / "out.mp4", detector, restorer, options))
    runs = [sorted(rs, key=lambda r: r.seconds)[len(rs) // 2] for rs in done.values()]
    table = _table(args, device, dtype, runs)
    print(table)
    if args.results is not None:
        with args.results.open("a") as f:
            f.write("\n" + table)
    return table


def _table(args, device: torch.device, dtype: torch.dtype, runs: list[Run]) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads"
    )
    kind = "tiny random" if args.tiny else "given"
    command = "python -m bench.video " + " ".join(args.argv)
    lines = [
        f"### {when}: video, {machine}",
        "",
        f"`{command}`; weights {kind}, {dtype}; clip {args.size} px wide, {args.frames} frames,"
        " two faces per frame (a real photo), x264 CRF 18, AAC remuxed; median of"
        f" {args.rounds} interleaved rounds.",
        "",
        "| mode | frames | faces | restorer calls | faces/call | wall s | frames/s | model s "
        "| faces/s (model) | ms/frame outside the model |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(r.row() for r in runs),
    ]
    speedup = (runs[1].frames / runs[1].seconds) / (runs[0].frames / runs[0].seconds)
    lines += ["", f"Batched across frames / one frame per call: **{speedup:.2f}x** frames/s."]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
