"""Full-size benchmark of the OSDFace restorer against an authors'-style baseline.

Builds the real architecture (SD2.1-base UNet and VAE from the bundled configs, the released
VRE config) with random weights written in the released layout (bench/fullsize.py), loads them
through the project's loading code, and measures on one device:

- per-stage time (VRE, VAE encode, UNet, VAE decode) and total time per face, at each batch size;
- faces per second; peak memory (CUDA: allocated by PyTorch; CPU: resident set, weights
  included); GMACs per face counted with `torch.utils.flop_counter`;
- the same for `bench/baseline.py` (fp32, batch 1, selection loop, unmerged LoRA, `.sample()`),
  and the ratio ours / baseline for each figure;
- PSNR of each configuration's output against fp32 (the baseline with `.mode()` latents, TF32
  off), on the same face;
- start-up: a fresh process from start to ready (weights loaded, warm-up done).

Times are medians of `--repeats` runs after `--warmup` runs. The table goes to stdout and is
appended to bench/RESULTS.md with the device, dtype, versions, settings and date.

    python -m bench.speed --device cpu
    python -m bench.speed --device cuda --configs fast:bfloat16,fast:float16 --batch-sizes 1,4,8,16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.baseline import AuthorsStyleBaseline
from bench.common import (
    DTYPES,
    REPO,
    RESULTS,
    environment,
    fast_config,
    free_memory,
    parse_configs,
    peak_gib,
    psnr,
    reset_peak,
    sample_faces,
    strict_fp32,
)
from bench.flops import count_gmacs
from bench.fullsize import ensure_weights
from bench.report import Row, format_report, summarize
from model.networks.restorer import STAGES, OSDFaceRestorer

logger = logging.getLogger("bench")

# --- measuring -------------------------------------------------------------------------------


def timed_runs(
    call: Callable[[], object], repeats: int, batch: int, device: torch.device
) -> tuple[dict[str, float], float, float]:
    """Median per-face seconds: per stage, in total (wall clock, copies included), and the
    process's CPU time (unlike wall time, barely moved by other processes on a shared CPU)."""
    stage_runs: dict[str, list[float]] = {k: [] for k in STAGES}
    totals, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = call()
        totals.append(time.perf_counter() - start)  # the output is on the CPU: all work done
        cpus.append(time.process_time() - cpu_start)
        for k in STAGES:
            stage_runs[k].append(out.timings[k])
    stages = {k: statistics.median(v) / batch for k, v in stage_runs.items()}
    return stages, statistics.median(totals) / batch, statistics.median(cpus) / batch


def run_baseline(
    weights: Path, device: torch.device, face: torch.Tensor, args
) -> tuple[Row, torch.Tensor]:
    """The authors'-style baseline at batch 1; returns its row and the fp32 parity reference."""
    row = Row("baseline", "authors", "float32", 1)
    start = time.perf_counter()
    baseline = AuthorsStyleBaseline.from_weights(weights, device)
    row.load_s = time.perf_counter() - start
    start = time.perf_counter()
    with strict_fp32(device):  # the first call is the warm-up, and gives the fp32 reference
        reference = baseline(face, latent="mode").images
    row.first_call_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        baseline(face, latent="sample")
    reset_peak(device)
    row.stages, row.total, row.cpu = timed_runs(
        lambda: baseline(face, latent="sample"), args.repeats, 1, device
    )
    row.peak_gib = peak_gib(device)
    return row, reference  # the caller frees the memory once this frame is gone


def plain_reference(weights: Path, device: torch.device, face: torch.Tensor) -> torch.Tensor:
    """The fp32 parity reference from the plain restorer, when there is no baseline."""
    restorer = OSDFaceRestorer.from_pretrained(weights, device, torch.float32)
    with strict_fp32(device):
        return restorer(face).images


def run_ours(
    weights: Path, device: torch.device, dtype: str, variant: str, faces: torch.Tensor,
    reference: torch.Tensor | None, args, rows: list[Row],
) -> None:  # fmt: skip
    """Measure one configuration at each batch size, appending a row per size to `rows`."""
    start = time.perf_counter()
    restorer = OSDFaceRestorer.from_pretrained(
        weights, device, DTYPES[dtype], fast=fast_config(variant, args)
    )
    load_s = time.perf_counter() - start
    fast = restorer.describe()["fast_path"]
    logger.info("ours %s %s loaded in %.1f s; fast path %s", variant, dtype, load_s, fast)
    for b in args.batch_sizes:
        row = Row("ours", variant, dtype, b, load_s=load_s)
        rows.append(row)
        x = faces[:b]
        reset_peak(device)
        try:
            start = time.perf_counter()
            first = restorer(x)
            row.first_call_s = time.perf_counter() - start
            if reference is not None:
                row.psnr_db = psnr(first.images[:1], reference)
            for _ in range(args.warmup - 1):
                restorer(x)
            row.stages, row.total, row.cpu = timed_runs(
                lambda x=x: restorer(x), args.repeats, b, device
            )
            row.peak_gib = peak_gib(device)
            failures = restorer.describe()["fast_path"].get("graph_failures")
            if failures:
                row.note = f"eager stages (graph capture failed): {sorted(failures)}"
        except torch.OutOfMemoryError:
            row.note = "out of memory"
            logger.warning("ours %s %s batch %d: out of memory", variant, dtype, b)
            free_memory(device)
            break
        logger.info("ours %s %s batch %d: %.1f ms/face", variant, dtype, b, row.total * 1e3)
    # the caller frees the memory once this frame is gone


def measure_startup(weights: Path, device: torch.device, dtype: str, variant: str, args) -> dict:
    """A fresh interpreter: import, load the merged safetensors, warm up; seconds to ready."""
    cmd = [
        sys.executable, "-m", "bench.speed", "--startup-child", str(time.time()),
        "--weights-dir", str(weights), "--device", str(device), "--configs", f"{variant}:{dtype}",
        "--batch-sizes", ",".join(map(str, args.batch_sizes)),
        "--compile-mode", args.compile_mode,
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    ready, report = None, {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY "):
            ready = time.perf_counter() - start
            report = json.loads(line[len("READY ") :])
    proc.wait()
    if ready is None or proc.returncode != 0:
        return {"variant": variant, "dtype": dtype, "error": f"exit code {proc.returncode}"}
    return {"variant": variant, "dtype": dtype, "ready_s": ready, **report}


def startup_child(args) -> None:
    """Runs in the fresh process of `measure_startup`; prints READY and its breakdown
    (`import_s`: from the spawn to here, interpreter start-up and imports)."""
    import_s = time.time() - args.startup_child
    imported = time.perf_counter()
    device, (variant, dtype) = torch.device(args.device), args.configs[0]
    restorer = OSDFaceRestorer.from_pretrained(
        args.weights_dir, device, DTYPES[dtype], fast=fast_config(variant, args)
    )
    loaded = time.perf_counter()
    restorer.warmup(batch_size=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done = time.perf_counter()
    breakdown = {
        "import_s": import_s,
        "load_s": loaded - imported,
        "warmup_s": done - loaded,
    }
    print("READY " + json.dumps(breakdown), flush=True)


# --- main ------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--configs",
        type=parse_configs,
        help="VARIANT:DTYPE,... run in this order, compile ones last; variants: plain (merged "
        "LoRA + batched VRE only), fast (FastPathConfig), overlap (fast + the VRE on a side "
        "CUDA stream), nosubpixel (fast without subpixel_upsample), compile (fast + "
        "torch.compile); "
        "default: cpu fast:float32, cuda fast:bfloat16,fast:float16",
    )
    p.add_argument("--batch-sizes", type=_ints, help="default: cpu 1, cuda 1,4,8,16")
    p.add_argument("--compile-batch-sizes", type=_ints, help="for compile configs (default: all)")
    p.add_argument("--repeats", type=int, help="timed runs (default: cpu 2, cuda 20)")
    p.add_argument("--warmup", type=int, help="untimed runs first, >= 1 (default: cpu 1, cuda 3)")
    p.add_argument("--weights-dir", type=Path, help="reuse or create here (default: a temp dir)")
    p.add_argument("--tiny", action="store_true", help="tiny weights: to try the harness quickly")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-startup", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--threads", type=int, help="CPU intra-op threads for the fast path")
    p.add_argument(
        "--time-budget",
        type=float,
        default=float("inf"),
        help="seconds; configurations not started by then are skipped",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--note", default="", help="a line added under the table")
    p.add_argument("--summarize", type=Path, help="print the summary of a --json file and exit")
    # The start-up child gets the wall-clock time it was spawned at.
    p.add_argument("--startup-child", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    default = [("fast", "bfloat16"), ("fast", "float16")] if cuda else [("fast", "float32")]
    args.configs = args.configs or default
    args.batch_sizes = args.batch_sizes or ([1, 4, 8, 16] if cuda else [1])
    args.compile_batch_sizes = args.compile_batch_sizes or args.batch_sizes
    args.repeats = args.repeats or (20 if cuda else 2)
    args.warmup = max(1, args.warmup or (3 if cuda else 1))
    return args


class TerminatedError(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, report what was measured.

    A BaseException, so the per-configuration error handling does not swallow it.
    """


def _on_sigterm(signum: int, frame: object) -> None:
    raise TerminatedError(f"signal {signum}")


def measure_all(args, device: torch.device, weights: Path, rows: list, startups: list) -> None:
    """Baseline, then the configs (compile ones last, after the start-up); fills rows/startups."""
    began = time.perf_counter()
    size = json.loads((weights / "osdface/config.json").read_text())["image_size"]
    faces = sample_faces(max(args.batch_sizes + args.compile_batch_sizes), size)
    reference = None
    if not args.no_baseline:
        try:
            base_row, reference = run_baseline(weights, device, faces[:1], args)
            logger.info("baseline: %.1f ms/face", base_row.total * 1e3)
        except Exception as exc:
            logger.exception("baseline failed")
            base_row = Row("baseline", "authors", "float32", 0, note=f"failed: {exc}"[:200])
        rows.append(base_row)
        free_memory(device)
    if reference is None:
        reference = plain_reference(weights, device, faces[:1])
        free_memory(device)
    eager = [c for c in args.configs if c[0] != "compile"]
    compiled = [c for c in args.configs if c[0] == "compile"]
    for variant, dtype in eager:
        _guarded(run_ours, weights, device, dtype, variant, faces, reference, args, rows)
    fast = [c for c in eager if c[0] == "fast"] or eager
    if not args.no_startup and fast:
        variant, dtype = fast[0]
        startups.append(measure_startup(weights, device, dtype, variant, args))
        logger.info("start-up: %s", startups[-1])
    for variant, dtype in compiled:
        if time.perf_counter() - began > args.time_budget:
            rows.append(Row("ours", variant, dtype, 0, note="skipped: time budget"))
            continue
        compile_args = argparse.Namespace(**{**vars(args), "batch_sizes": args.compile_batch_sizes})
        _guarded(run_ours, weights, device, dtype, variant, faces, reference, compile_args, rows)


def _guarded(run, weights, device, dtype, variant, faces, reference, args, rows) -> None:
    """One configuration; an error is reported in the table and the next one still runs."""
    try:
        run(weights, device, dtype, variant, faces, reference, args, rows)
    except Exception as exc:
        logger.exception("ours %s %s failed", variant, dtype)
        rows.append(
            Row("ours", variant, dtype, 0, note=f"failed: {type(exc).__name__}: {exc}"[:200])
        )
    free_memory(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.startup_child is not None:
        startup_child(args)
        return 0
    if args.summarize:
        print(summarize(json.loads(args.summarize.read_text())))
        return 0
    device = torch.device(args.device)
    began = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    rows: list[Row] = []
    startups: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="osdface-bench-") as tmp:
        weights = ensure_weights(args.weights_dir or Path(tmp) / "weights", tiny=args.tiny)
        gmacs = count_gmacs(weights)
        logger.info("GMACs per face: %s", {k: round(v, 1) for k, v in gmacs.items()})
        try:
            measure_all(args, device, weights, rows, startups)
        except TerminatedError as stop:
            args.note = f"{args.note} Stopped early ({stop}); the last row may be partial.".strip()
            logger.warning("interrupted: reporting what was measured")
    env = environment(device, args)
    report = format_report(env, gmacs, rows, startups, args)
    print("\n" + report)
    with args.results.open("a") as f:
        f.write("\n" + report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"env": env, "gmacs": gmacs, "rows": [dataclasses.asdict(r) for r in rows],
                   "startups": startups, "elapsed_s": time.perf_counter() - began}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    logger.info("done in %.0f s; appended to %s", time.perf_counter() - began, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
