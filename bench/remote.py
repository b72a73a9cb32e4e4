"""Photos per second: the local `osdface restore` against `osdface restore --url` to a service on
the same machine, and what the client adds to each request.

    python -m bench.remote --tiny --inputs 24                  # this machine, CPU, tiny weights
    python -m bench.remote --weights W --device cuda --inputs 400

Copies real photos (../shared/assets, or OSDFACE_TEST_ASSETS) into --inputs files, then:

1. the local command, as a user runs it (a fresh process: start-up and model loading included),
2. the same command with `--url` to `osdface serve` started on the same weights beforehand
   (its start-up timed apart; a fresh process, the service already warm), alternated with 1
   for --rounds rounds;
3. the client's overhead per request: one photo sent --requests times, one at a time, through
   `osdface.client`; the time of each call minus the service's own `X-Total-Time` (arrival to
   answer, on the server) is what the client, the HTTP stack and loopback add. Measured for
   the image answer and for the JSON answer (base64 image, faces: what `--url` uses).

Each run's summary line gives the time spent restoring (the local command's clock starts once
the model is loaded). Appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.inputs import assets, weights_folder
from bench.load import start_server, stop_server
from bench.ray_restore import PHOTOS, make_inputs
from osdface.client import Client, RestoreOptions

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"(\d+) files? restored, (\d+) faces?, .*?; ([\d.]+) s,")
OVERHEAD_PHOTO = PHOTOS[3]  # a whole photo with two faces


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", type=int, default=24, help="files, copies of the photos in turn")
    p.add_argument("--tiny", action="store_true", help="tiny random weights (tests/tiny_weights)")
    p.add_argument("--weights", type=Path, help="a weights folder (instead of --tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--detector", default="retinaface_mobile0.25")
    p.add_argument("--batch-size", type=int, default=4, help="faces per model call, both ways")
    p.add_argument("--concurrency", type=int, help="--url's (default: its own)")
    p.add_argument("--requests", type=int, default=30, help="requests for the overhead")
    p.add_argument("--rounds", type=int, default=2, help="local and --url runs, alternated")
    p.add_argument("--results", type=Path, default=REPO / "bench/RESULTS.md")
    p.add_argument("--note", default="", help="a sentence added to the results section")
    return p.parse_args()


def run(argv: list[str]) -> tuple[float, int, int, float]:
    """(wall s, photos, faces, restoring s from the summary line) of one command."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited with {done.returncode}:\n{done.stderr}")
    found = SUMMARY.findall(done.stderr)
    if not found:
        raise SystemExit(f"no summary line in:\n{done.stderr}")
    photos, faces, seconds = found[-1]
    return wall, int(photos), int(faces), float(seconds)


def overhead_ms(base: str, photo: bytes, requests: int) -> dict[str, list[float]]:
    """Per answer kind: client-side call time minus the service's X-Total-Time, in ms."""
    out: dict[str, list[float]] = {"image": [], "json": []}
    with Client(base, deadline_s=600, env={}) as client:
        client.restore(photo)  # warm: connection, first batch
        for _ in range(requests):
            for kind, call in (("image", client.restore), ("json", client.restore_json)):
                start = time.perf_counter()
                result = call(photo, RestoreOptions(), filename="photo.jpg")
                took = time.perf_counter() - start
                assert result.timings.total_s is not None and not result.retried
                out[kind].append((took - result.timings.total_s) * 1000)
    return out


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="osdface-remote-bench-"))
    weights = weights_folder(args.weights, args.tiny, work / "weights")
    inputs = work / "inputs"
    make_inputs(inputs, args.inputs)
    osdface = [sys.executable, "-m", "osdface", "restore", str(inputs)]
    local = ["--weights", str(weights), "--device", args.device, "--detector", args.detector]
    local += ["--batch-size", str(args.batch_size)]
    started = time.perf_counter()
    env = {"OSDFACE_MAX_BATCH_FACES": str(args.batch_size)}
    process, base = start_server(args, weights, env, work / "serve.log")
    startup = time.perf_counter() - started
    rows: dict[str, tuple[float, int, int, float]] = {}
    try:
        remote = ["--url", base]
        remote += ["--concurrency", str(args.concurrency)] if args.concurrency else []
        # Alternated, so that a machine shared with other work loads both alike; the idle
        # service waits beside the local runs.
        for k in range(1, args.rounds + 1):
            for name, flags in (("local", local), ("--url", remote)):
                out = work / f"{name.strip('-')}-{k}"
                rows[f"{name}, round {k}"] = run([*osdface, "-o", str(out), *flags])
        photo = (assets() / "images" / OVERHEAD_PHOTO).read_bytes()
        overhead = overhead_ms(base, photo, args.requests)
    finally:
        stop_server(process)
    section = results_section(args, rows, startup, overhead)
    section += f"\n`{shlex.join(['python', '-m', 'bench.remote', *sys.argv[1:]])}`\n"
    print(section)
    with args.results.open("a") as f:
        f.write("\n" + section)
    shutil.rmtree(work, ignore_errors=True)


def results_section(
    args: argparse.Namespace,
    rows: dict[str, tuple[float, int, int, float]],
    startup: float,
    overhead: dict[str, list[float]],
) -> str:
    load = os.getloadavg()[0]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {when}: local CLI vs --url, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (load average {load:.1f} at the end)",
        "",
        f"{args.inputs} photos, {'tiny' if args.tiny else 'given'} weights, {args.device}, "
        f"{args.detector}, batch {args.batch_size}, the service on the same machine "
        f"(loopback). Wall: the whole command (local: start-up and model loading included; "
        f"--url: start-up, the service already warm; its own start took {startup:.1f} s). "
        "Restoring: the summary line's clock (local: after the model loaded).",
        "",
        "| command | wall s | photos | faces | photos/s (wall) | restoring s | photos/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (wall, photos, faces, seconds) in rows.items():
        lines.append(
            f"| {name} | {wall:.1f} | {photos} | {faces} | {photos / wall:.3f} | "
            f"{seconds:.1f} | {photos / seconds:.3f} |"
        )
    lines += [
        "",
        f"The client's overhead per request ({args.requests} requests of one photo, "
        f"{OVERHEAD_PHOTO}, one at a time): call time through `osdface.client` minus the "
        "service's X-Total-Time.",
        "",
        "| answer | median ms | p95 ms | max ms |",
        "|---|---|---|---|",
    ]
    for kind, values in overhead.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        lines.append(
            f"| {kind} | {statistics.median(values):.1f} | {p95:.1f} | {ordered[-1]:.1f} |"
        )
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
