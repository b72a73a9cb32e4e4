"""Load benchmark of the HTTP service: cross-request batching against a one-at-a-time baseline.

Starts a real `osdface serve` twice, one after the other, on the same weights and machine:

- batched:  faces of concurrent requests share model calls (max_batch_faces=8, 10 ms delay,
            2 CPU threads for decode/detect/paste);
- baseline: one face per model call, no waiting, 1 CPU thread (max_batch_faces=1,
            max_batch_delay_ms=0, cpu_workers=1): one image at a time through the model.

Each is driven at concurrency 1, 4 and 16 (closed loop: each client sends its next request
when the previous answer arrives) and the table gives throughput and p50/p95/p99 latency, and
the throughput ratio batched / baseline per concurrency.

    python -m bench.load --tiny                       # tiny random weights (CPU smoke numbers)
    python -m bench.load --weights ./osdface-weights  # the real model
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.inputs import assets, weights_folder
from osdface.client import AsyncClient, ClientError, RestoreOptions, RetryPolicy

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench.load")

CONFIGS: dict[str, dict[str, str]] = {
    "batched": {
        "OSDFACE_MAX_BATCH_FACES": "8",
        "OSDFACE_MAX_BATCH_DELAY_MS": "10",
        "OSDFACE_CPU_WORKERS": "2",
    },
    "baseline": {
        "OSDFACE_MAX_BATCH_FACES": "1",
        "OSDFACE_MAX_BATCH_DELAY_MS": "0",
        "OSDFACE_CPU_WORKERS": "1",
    },
}
COMMON_ENV = {
    "OSDFACE_MAX_QUEUE_FACES": "64",
    "OSDFACE_MAX_INFLIGHT_REQUESTS": "64",
    "OSDFACE_REQUEST_TIMEOUT_S": "600",
    "OSDFACE_LOG_LEVEL": "warning",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class Row:
    config: str
    concurrency: int
    requests: int
    ok: int
    failed: int
    seconds: float
    throughput: float  # successful requests per second
    p50: float
    p95: float
    p99: float
    faces_per_call: float  # mean faces per model call during this level (osdface_batch_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError("server not ready")


def start_server(args: argparse.Namespace, weights: Path, env: dict[str, str], log: Path):
    port = free_port()
    command = [sys.executable, "-m", "osdface", "serve", "--weights", str(weights)]
    command += ["--detector", args.detector, "--port", str(port), "--device", args.device]
    full_env = {**os.environ, **COMMON_ENV, **env}
    out = log.open("wb")
    process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, process)
    return process, base


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def bench_client(base: str, connections: int, deadline_s: float = 600.0) -> AsyncClient:
    """osdface.client without retries: every 429 or failure is counted as the server gave it."""
    return AsyncClient(
        base, retry=RetryPolicy.never(), deadline_s=deadline_s, max_connections=connections
    )


async def drive(
    base: str, image: bytes, options: RestoreOptions, concurrency: int, total: int
) -> tuple[list[float], int, float]:
    """Closed loop: `concurrency` clients share `total` requests. (latencies, failures, wall)."""
    latencies: list[float] = []
    failures = 0
    remaining = total

    async with bench_client(base, concurrency) as client:

        async def client_loop() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                try:
                    await client.restore(image, options, filename="in.jpg")
                except ClientError as exc:  # an error answer, or the server went away
                    failures += 1
                    logger.warning("request failed: %s", exc)
                    continue
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, failures, wall


def scrape(base: str) -> dict[str, float]:
    """The server's metric samples, by name plus labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def faces_per_call(before: dict[str, float], after: dict[str, float]) -> float:
    calls = after["osdface_batch_size_count{}"] - before["osdface_batch_size_count{}"]
    faces = after["osdface_batch_size_sum{}"] - before["osdface_batch_size_sum{}"]
    return faces / calls if calls else float("nan")


def measure(args, name: str, base: str, image: bytes, options: RestoreOptions) -> list[Row]:
    # Warm the path (first requests pay allocator and kernel set-up).
    asyncio.run(drive(base, image, options, 2, 4))
    rows = []
    for concurrency in args.concurrency:
        total = max(args.requests, concurrency * args.per_client)
        before = scrape(base)
        latencies, failures, wall = asyncio.run(drive(base, image, options, concurrency, total))
        after = scrape(base)
        lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
        row = Row(
            name,
            concurrency,
            total,
            len(latencies),
            failures,
            wall,
            len(latencies) / wall,
            *(float(np.percentile(lat, q)) for q in (50, 95, 99)),
            faces_per_call(before, after),
        )
        logger.info("%s", row)
        rows.append(row)
    memory = {k: v for k, v in scrape(base).items() if k.startswith("osdface_device_memory")}
    logger.info("%s device memory: %s", name, memory)
    return rows


def table(rows: list[Row]) -> str:
    head = f"{'config':<9} {'conc':>4} {'reqs':>5} {'ok':>5} {'req/s':>8} "
    head += f"{'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'faces/call':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.config:<9} {r.concurrency:>4} {r.requests:>5} {r.ok:>5} {r.throughput:>8.2f} "
            f"{r.p50:>8.3f} {r.p95:>8.3f} {r.p99:>8.3f} {r.faces_per_call:>10.2f}"
        )
    lines.append("")
    base = {r.concurrency: r for r in rows if r.config == "baseline"}
    for r in rows:
        if r.config == "batched" and r.concurrency in base:
            b = base[r.concurrency]
            lines.append(
                f"concurrency {r.concurrency:>2}: throughput x{r.throughput / b.throughput:.2f}, "
                f"p50 x{r.p50 / b.p50:.2f} (batched / baseline)"
            )
    return "\n".join(lines)


def input_image(args: argparse.Namespace) -> tuple[bytes, RestoreOptions]:
    if args.image:
        return args.image.read_bytes(), RestoreOptions(aligned=args.aligned)
    crop = assets() / "images/gfpgan/cropped_faces/Adele_crop.png"
    buf = io.BytesIO()
    with Image.open(crop) as im:
        im.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue(), RestoreOptions(aligned=True)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The server and input flags both load benchmarks take."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="weights folder")
    source.add_argument("--tiny", action="store_true", help="tiny random weights (tests' layout)")
    p.add_argument("--detector", default="retinaface_mobile0.25")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--image", type=Path, help="input (default: an aligned crop from the assets)")
    p.add_argument("--aligned", action="store_true", help="--image is an aligned 512 crop")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="at least this many per level")
    p.add_argument("--per-client", type=int, default=4, help="and at least this many per client")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--log-dir", type=Path, help="keep the servers' logs here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    with tempfile.TemporaryDirectory() as tmp:
        weights = weights_folder(args.weights, args.tiny, Path(tmp) / "w")
        image, options = input_image(args)
        rows: list[Row] = []
        for name, env in CONFIGS.items():
            log_dir = args.log_dir or Path(tmp)
            log_dir.mkdir(parents=True, exist_ok=True)
            process, base = start_server(args, weights, env, log_dir / f"{name}.log")
            try:
                rows += measure(args, name, base, image, options)
            finally:
                stop_server(process)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
