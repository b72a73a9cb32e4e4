"""Video jobs on one and on two replicas sharing a Redis job store, and the takeover time.

Starts a real `redis-server` and real `osdface serve` replicas (as a deployment does: one jobs
folder, OSDFACE_JOBS_REDIS_URL), submits `--jobs` short clips made from a real photo (its faces
go through the model) and reports jobs finished per minute; then, on two replicas, submits a
long clip, SIGKILLs the replica that runs it once a segment is done, and reports the takeover:
from the dead replica's lease expiry (the store's `lease_until`) to the first frame the other
replica reports, and from the kill to that frame.

    python -m bench.replicas --tiny                 # tiny random weights, CPU
    python -m bench.replicas --weights osdface-weights --device cuda
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from fractions import Fraction
from pathlib import Path

import av
import cv2
import httpx
import numpy as np

from bench.inputs import assets, weights_folder
from bench.load import add_server_arguments, free_port, start_server, stop_server
from service.jobstore import open_store

PHOTO = "images/gfpgan/whole_imgs/Blake_Lively.jpg"  # two faces the mobile detector finds
LEASE_S = 3


def write_clip(path: Path, photo: Path, frames: int, fps: int = 25) -> None:
    """The photo at 256 px wide, drifting a pixel per frame (faces move, as in a video)."""
    bgr = cv2.imread(str(photo))
    assert bgr is not None, photo
    height = int(round(bgr.shape[0] * 256 / bgr.shape[1] / 2) * 2)
    rgb = np.ascontiguousarray(cv2.resize(bgr, (256, height))[..., ::-1])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 256, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(rgb, i % 8, axis=1), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@contextmanager
def redis(folder: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def replicas(args, weights: Path, env: dict[str, str], count: int, logs: Path):
    with ExitStack() as stack:
        started = []
        for i in range(count):
            process, base = start_server(args, weights, env, logs / f"replica-{i}.log")
            stack.callback(lambda p=process: p.poll() is None and stop_server(p))
            started.append((process, base))
        yield started


def submit(base: str, clip: Path) -> str:
    files = {"video": (clip.name, clip.read_bytes(), "video/mp4")}
    answer = httpx.post(f"{base}/v1/jobs", files=files, timeout=120)
    answer.raise_for_status()
    return answer.json()["id"]


def state(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()


def jobs_per_minute(args, weights, clip: Path, env, count: int, logs: Path) -> float:
    with replicas(args, weights, env, count, logs) as servers:
        bases = [base for _, base in servers]
        started = time.monotonic()
        ids = [submit(bases[i % len(bases)], clip) for i in range(args.jobs)]
        pending = set(ids)
        while pending:
            for job_id in list(pending):
                seen = state(bases[0], job_id)["state"]
                if seen in ("failed", "cancelled"):
                    raise RuntimeError(f"job {job_id} {seen}")
                if seen == "succeeded":
                    pending.discard(job_id)
            time.sleep(0.2)
        return args.jobs / ((time.monotonic() - started) / 60)


def takeover(args, weights, clip: Path, env, url: str, logs: Path) -> tuple[float, float, float]:
    """Seconds from the dead replica's lease expiry to the other's claim, to its first frames
    (reported per window of frames), and from the kill to those frames."""
    with (
        replicas(args, weights, env, 2, logs) as servers,
        open_store(Path(env["OSDFACE_JOBS_DIR"]), url) as store,
    ):
        job_id = submit(servers[0][1], clip)
        while (record := store.get(job_id)) is None or record.segments_done < 1:
            time.sleep(0.02)
        owner = record.owner or ""
        victim = next(p for p, _ in servers if f"-{p.pid}-" in owner)
        lease_until = store.get(job_id).lease_until or 0.0
        victim.send_signal(signal.SIGKILL)
        killed, frames_at_kill = time.time(), store.get(job_id).frames_done
        while (record := store.get(job_id)) is None or record.owner in (None, owner):
            time.sleep(0.02)
        claimed = time.time()
        while True:
            record = store.get(job_id)
            moved = record is not None and (
                record.frames_done != frames_at_kill or record.segments_done > 1
            )
            if record is not None and record.owner not in (None, owner) and moved:
                break
            time.sleep(0.02)
        first_frame = time.time()
        return claimed - lease_until, first_frame - lease_until, first_frame - killed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--jobs", type=int, default=4, help="short jobs per replica count")
    p.add_argument("--frames", type=int, default=24, help="frames of each short clip")
    p.add_argument("--long-frames", type=int, default=96, help="frames of the takeover clip")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = weights_folder(args.weights, args.tiny, root / "w")
        short, long = root / "short.mp4", root / "long.mp4"
        write_clip(short, assets() / PHOTO, args.frames)
        write_clip(long, assets() / PHOTO, args.long_frames)
        rows = []
        with redis(root) as url:
            for count in (1, 2):
                jobs_dir = root / f"jobs-{count}"
                env = job_env(jobs_dir, f"{url[:-1]}{count}")
                rows.append((count, jobs_per_minute(args, weights, short, env, count, root)))
            env = job_env(root / "jobs-takeover", f"{url[:-1]}3")
            claim, expiry, kill = takeover(
                args, weights, long, env, env["OSDFACE_JOBS_REDIS_URL"], root
            )
    print(f"\n{args.jobs} jobs of {args.frames} frames (256 px, 2 faces each frame)\n")
    print("| replicas | jobs/min | ratio |\n|---:|---:|---:|")
    for count, rate in rows:
        print(f"| {count} | {rate:.2f} | {rate / rows[0][1]:.2f}x |")
    print(f"\ntakeover after SIGKILL (lease {LEASE_S} s, windows of 8 frames):\n")
    print("| lease expiry -> claimed | lease expiry -> first window | kill -> first window |")
    print(f"|---:|---:|---:|\n| {claim:.2f} s | {expiry:.2f} s | {kill:.2f} s |")
    return 0


def job_env(jobs_dir: Path, url: str) -> dict[str, str]:
    return {
        "OSDFACE_JOBS_DIR": str(jobs_dir),
        "OSDFACE_JOBS_REDIS_URL": url,
        "OSDFACE_JOB_LEASE_S": str(LEASE_S),
        "OSDFACE_JOB_WINDOW_FRAMES": "8",
        "OSDFACE_JOB_SEGMENT_FRAMES": "16",
        "OSDFACE_CPU_WORKERS": "1",
    }


if __name__ == "__main__":
    sys.exit(main())
