"""What tracing costs the service: throughput and server CPU per request with tracing off, on
with sampling 0, and on with sampling 1, in one run.

Starts one real `osdface serve` per configuration, all on the same weights, and keeps them all
running; then drives them in interleaved rounds (each round visits every configuration, in a
rotating order), so a machine that slows down or speeds up during the run touches every
configuration alike. Each round is a closed loop of `--concurrency` clients sending
`--requests` restores through `osdface.client`.

- off:    no OTEL_* variable: nothing of OpenTelemetry is imported;
- ratio0: OTLP endpoint set, `parentbased_traceidratio` with 0: every span is created but none
          is sampled or exported;
- ratio1: the same with 1: every span is recorded and exported, over OTLP/HTTP, to a loopback
          receiver in this process (tests/otlp_receiver.py), which counts what arrives;
- before: only with `--baseline-rev REV`: the service of that git revision (`git archive`,
          nothing checked out), with no OTEL_* variable: "today", for the off case to be
          compared with.

Reported per configuration: the median over rounds of throughput, p50/p95 latency, the server
process's CPU seconds per request (user + system, from psutil), and the ratios to `off`.

On a CPU the model's hundreds of milliseconds per request hide a cost of a few hundred
microseconds in any end-to-end figure, so a second table measures the tracing work of one
request directly: in this process, `--replay` times the calls one `POST /restore` with one
face makes, in its order and with the service's own functions (service/tracing.py,
service/tracing_worker.py, the metrics with exemplars, the log filter), around no work: `none`
(only the metrics and log filter, which exist without tracing), `off`, `ratio0`, `ratio1`
(spans exported by the SDK's batch processor over OTLP/HTTP to a receiver in a child process;
the export thread's CPU included). CPU microseconds per request.

    python -m bench.tracing --tiny                          # tiny random weights on the CPU
    python -m bench.tracing --tiny --baseline-rev HEAD      # and the committed service
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.inputs import weights_folder
from bench.load import (
    COMMON_ENV,
    REPO,
    add_server_arguments,
    drive,
    free_port,
    input_image,
    stop_server,
    wait_ready,
)
from osdface.client import RestoreOptions

logger = logging.getLogger("bench.tracing")

SAMPLING = {"off": None, "ratio0": "0", "ratio1": "1"}
SERVER_ENV = {
    "OSDFACE_MAX_BATCH_FACES": "8",
    "OSDFACE_MAX_BATCH_DELAY_MS": "10",
    "OSDFACE_CPU_WORKERS": "2",
    "OMP_NUM_THREADS": "2",
}


@dataclass
class Row:
    config: str
    rounds: int
    requests: int  # per round
    failed: int  # over all rounds
    throughput: float  # median over rounds, successful requests per second
    throughput_min: float
    throughput_max: float
    p50: float  # seconds, all rounds pooled
    p95: float
    cpu_ms: float  # median over rounds: server CPU (user + system) per request, ms
    spans_per_request: float  # spans the receiver got per request (ratio1 only)


def tracing_env(ratio: str | None, endpoint: str) -> dict[str, str]:
    if ratio is None:
        return {}
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": ratio,
    }


def export_tree(rev: str, into: Path) -> Path:
    """The source tree of git revision `rev`, unpacked under `into` (no checkout, no index)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def start(
    args: argparse.Namespace, weights: Path, env: dict[str, str], log: Path, cwd: Path
) -> tuple[subprocess.Popen, str]:
    """`python -m osdface serve` from the tree `cwd` (its packages come first on sys.path)."""
    port = free_port()
    command = [sys.executable, "-m", "osdface", "serve", "--weights", str(weights)]
    command += ["--detector", args.detector, "--port", str(port), "--device", args.device]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full_env |= {**COMMON_ENV, **SERVER_ENV, **env}
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, process)
    return process, base


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def run(args: argparse.Namespace, weights: Path, tmp: Path) -> list[Row]:
    from tests.otlp_receiver import OtlpReceiver

    image, options = input_image(args)
    log_dir = args.log_dir or tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    configs: dict[str, tuple[dict[str, str], Path]] = {}
    with OtlpReceiver() as receiver:
        if args.baseline_rev:
            configs["before"] = ({}, export_tree(args.baseline_rev, tmp / "before"))
        for name, ratio in SAMPLING.items():
            configs[name] = (tracing_env(ratio, receiver.endpoint), REPO)
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for name, (env, cwd) in configs.items():
                servers[name] = start(args, weights, env, log_dir / f"{name}.log", cwd)
                logger.info("%s ready at %s", name, servers[name][1])
            rows = measure(args, servers, image, options)
        finally:
            for process, _ in servers.values():
                stop_server(process)  # ratio1 exports what it still holds before it exits
        # Only ratio1 samples: every span received is one of its requests' (warm-up included).
        sent = args.concurrency + args.rounds * args.requests
        for row in rows:
            if row.config == "ratio1":
                row.spans_per_request = len(receiver.received()) / sent
        return rows


def measure(
    args: argparse.Namespace,
    servers: dict[str, tuple[subprocess.Popen, str]],
    image: bytes,
    options: RestoreOptions,
) -> list[Row]:
    names = list(servers)
    for name in names:  # warm each path (allocator, first batches)
        asyncio.run(drive(servers[name][1], image, options, args.concurrency, args.concurrency))
    throughput: dict[str, list[float]] = {n: [] for n in names}
    cpu_ms: dict[str, list[float]] = {n: [] for n in names}
    latencies: dict[str, list[float]] = {n: [] for n in names}
    failed = dict.fromkeys(names, 0)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            process, base = servers[name]
            cpu_before = cpu_seconds(process.pid)
            lat, failures, wall = asyncio.run(
                drive(base, image, options, args.concurrency, args.requests)
            )
            throughput[name].append(len(lat) / wall)
            cpu_ms[name].append(1000 * (cpu_seconds(process.pid) - cpu_before) / args.requests)
            latencies[name] += lat
            failed[name] += failures
            logger.info("round %d %s: %.2f req/s", r, name, throughput[name][-1])
    rows = []
    for name in names:
        pooled = np.asarray(latencies[name] or [float("nan")])
        rows.append(
            Row(
                name,
                args.rounds,
                args.requests,
                failed[name],
                statistics.median(throughput[name]),
                min(throughput[name]),
                max(throughput[name]),
                float(np.percentile(pooled, 50)),
                float(np.percentile(pooled, 95)),
                statistics.median(cpu_ms[name]),
                0.0,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """A Markdown table with the ratios to `off`, then `off` against `before` when run."""
    by = {r.config: r for r in rows}
    off = by["off"]
    lines = [
        "| config | req/s (median; min..max) | vs off | p50 s | p95 s | server CPU ms/req "
        "| vs off | spans/req | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.config} | {r.throughput:.2f} ({r.throughput_min:.2f}..{r.throughput_max:.2f}) "
            f"| {r.throughput / off.throughput:.3f} | {r.p50:.3f} | {r.p95:.3f} "
            f"| {r.cpu_ms:.1f} | {r.cpu_ms / off.cpu_ms:.3f} | {r.spans_per_request:.1f} "
            f"| {r.failed} |"
        )
    if "before" in by:
        before = by["before"]
        lines.append("")
        lines.append(
            f"off / before: throughput x{off.throughput / before.throughput:.3f}, "
            f"server CPU per request x{off.cpu_ms / before.cpu_ms:.3f}"
        )
    return "\n".join(lines)


# --- the tracing work of one request, replayed in process ----------------------------------------

PREPARE = {"decode": 0.004, "detect": 0.0, "align": 0.0}
MODEL = {"vre": 0.05, "vae_encode": 0.05, "unet": 0.1, "vae_decode": 0.1}
FINISH = {"paste": 0.02, "encode": 0.01}
RECEIVER = (
    "import sys; from tests.otlp_receiver import OtlpReceiver\n"
    "with OtlpReceiver() as r:\n    print(r.endpoint, flush=True); sys.stdin.read()\n"
)


@dataclass
class Queued:
    """What the model worker keeps of a submit (service.queue_items.QueuedWork's trace part)."""

    trace: Any
    links: list[Any]


def one_request(metrics: Any, log_filter: logging.Filter, traced: bool) -> None:
    """The tracing calls of one `POST /restore` with one aligned face, in the service's order
    (service/app.py, service/routes.py, service/batching.py), with the metric observations and
    the log line the request makes anyway. `traced=False`: those only, through the plain
    histogram (no exemplar lookup), as the service did before tracing."""
    from prometheus_client import Histogram

    from service import tracing, tracing_worker
    from service.queue_items import BatchResult

    def observe(histogram: Any, value: float) -> None:
        (histogram.observe if traced else lambda v: Histogram.observe(histogram, v))(value)

    def stages(timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if seconds > 0:
                observe(metrics.stage_duration.labels(stage=stage), seconds)

    now = time.monotonic()
    if not traced:
        observe(metrics.queue_wait, 0.01)
        stages(MODEL)
        stages({**PREPARE, **FINISH})
        log_filter.filter(logging.LogRecord("access", logging.INFO, "", 0, "POST", (), None))
        observe(metrics.request_duration.labels("/restore", "2xx"), 0.4)
        return
    span = tracing.start_request((), "POST", "/restore", now, "bench")
    with tracing.span("admission"):
        pass
    with tracing.span("upload") as upload:
        upload.set("osdface.upload.bytes", 30_000)
    tracing.stages(now, PREPARE, tracing.PREPARE_STAGES)
    work = Queued(tracing.sampled_context(), [])  # what QueuedWork keeps on submit
    with tracing_worker.within(work.trace):
        observe(metrics.queue_wait, 0.01)
    with tracing_worker.batch_span([(work, 0, 1)], {"osdface.device": "cpu"}) as batch:
        batch.ran(MODEL)
        stages(MODEL)
    result = BatchResult(None, 0.01, 0.3, MODEL, 1, now, tuple(work.links))  # type: ignore[arg-type]
    tracing.model_wait(result, 1)
    tracing.stages(now, FINISH, tracing.FINISH_STAGES)
    stages({**PREPARE, **FINISH})
    log_filter.filter(logging.LogRecord("access", logging.INFO, "", 0, "POST", (), None))
    observe(metrics.request_duration.labels("/restore", "2xx"), 0.4)
    if span is not None:
        span.end(200, "/restore", time.monotonic())


def replay(requests: int) -> dict[str, float]:
    """CPU microseconds per request of each configuration's tracing work (see the docstring)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from service import tracing
    from service.logs import ContextFilter
    from service.metrics import Metrics

    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdin is not None
    endpoint = child.stdout.readline().decode().strip()
    results = {}
    try:
        for name, ratio in {"none": None, **SAMPLING}.items():
            provider = None
            if ratio is not None:
                provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(float(ratio))))
                exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")
                provider.add_span_processor(
                    BatchSpanProcessor(exporter, max_queue_size=requests * 16)
                )
                tracing.install(provider)
            metrics, log_filter = Metrics(), ContextFilter()
            for _ in range(requests // 10):  # warm up
                one_request(metrics, log_filter, name != "none")
            started = time.process_time()
            for _ in range(requests):
                one_request(metrics, log_filter, name != "none")
            if provider is not None:
                provider.force_flush(60_000)  # the export's CPU is part of the cost
            results[name] = 1e6 * (time.process_time() - started) / requests
            if provider is not None:
                provider.shutdown()
            tracing.uninstall()
            logger.info("replay %s: %.1f us/request", name, results[name])
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    return results


def replay_table(us: dict[str, float]) -> str:
    lines = ["| tracing work of one request | CPU us/request | over none |", "|---|---|---|"]
    for name, value in us.items():
        lines.append(f"| {name} | {value:.1f} | {value - us['none']:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=24, help="per configuration and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline-rev", help="also run the service of this git revision")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--log-dir", type=Path, help="keep the servers' logs here")
    p.add_argument("--replay", type=int, default=2000, help="requests replayed in process (0: no)")
    p.add_argument("--no-servers", action="store_true", help="the replay only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    replayed = replay(args.replay) if args.replay else {}
    rows: list[Row] = []
    if not args.no_servers:
        with tempfile.TemporaryDirectory() as tmp:
            weights = weights_folder(args.weights, args.tiny, Path(tmp) / "w")
            rows = run(args, weights, Path(tmp))
        print(table(rows))
    if replayed:
        print()
        print(replay_table(replayed))
    if args.json:
        payload = {"servers": [asdict(r) for r in rows], "replay_us": replayed}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
