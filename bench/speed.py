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

Times are medians of `--repeats` runs after `--warmup` runs, each configuration warmed up first
as the service does (`restorer.warmup()` on the worker's own CUDA stream). Configurations run in
the order given (compile ones last), each guarded: a failure is a row with a note and the next
one runs. `--json` is rewritten after every row and once more at the end, whatever happened
(SIGTERM from `timeout` included); then the table goes to stdout and is appended to
bench/RESULTS.md with the device, dtype, versions, settings and date.

    python -m bench.speed --device cpu
    python -m bench.speed --device cuda --configs fast:bfloat16,fast:float16 --batch-sizes 1,4,8,16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from bench.baseline import AuthorsStyleBaseline
from bench.common import (
    BUSY,
    DTYPES,
    RESULTS,
    DefaultStreamLoad,
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
from bench.report import Results, Row, format_report, summarize
from bench.startup import measure_startup
from model.device import on_stream
from model.networks.restorer import STAGES, OSDFaceRestorer

logger = logging.getLogger("bench")
# Names of steps to fail on purpose (`baseline`, `VARIANT:DTYPE`, `startup:DTYPE`): the tests
# check that a failed step is reported and the others still run and are written.
FAIL_ENV = "BENCH_FAIL"


def injected(args, step: str) -> None:
    if step in args.fail:
        raise RuntimeError(f"injected failure of {step} ({FAIL_ENV})")


def failure(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {exc}"[:200]


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
    weights: Path, device: torch.device, face: torch.Tensor, args, results: Results
) -> torch.Tensor:
    """The authors'-style baseline at batch 1: adds its row, returns the fp32 parity reference."""
    injected(args, "baseline")
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
    results.add(row)
    logger.info("baseline: %.1f ms/face", row.total * 1e3)
    return reference  # the caller frees the memory once this frame is gone


def plain_reference(weights: Path, device: torch.device, face: torch.Tensor) -> torch.Tensor:
    """The fp32 parity reference from the plain restorer, when there is no baseline."""
    restorer = OSDFaceRestorer.from_pretrained(weights, device, torch.float32)
    with strict_fp32(device):
        return restorer(face).images


def run_ours(
    weights: Path, device: torch.device, dtype: str, variant: str, faces: torch.Tensor,
    reference: torch.Tensor | None, args, results: Results,
) -> None:  # fmt: skip
    """Load one configuration and warm it up as the service does (every captured size, on the
    worker's own stream), then measure each batch size: a row per size, saved when measured."""
    injected(args, f"{variant}:{dtype}")
    start = time.perf_counter()
    restorer = OSDFaceRestorer.from_pretrained(
        weights, device, DTYPES[dtype], fast=fast_config(variant, args)
    )
    load_s = time.perf_counter() - start
    fast = restorer.describe()["fast_path"]
    logger.info("ours %s %s loaded in %.1f s; fast path %s", variant, dtype, load_s, fast)
    stream = restorer.worker_stream()  # None on the CPU, or with the worker stream off
    start = time.perf_counter()
    with on_stream(stream):
        restorer.warmup(batch_size=max(args.batch_sizes))
    warmup_s = time.perf_counter() - start
    load = DefaultStreamLoad(device) if variant in BUSY else None
    with load or nullcontext():  # started after the warm-up: no capture beside it
        for b in args.batch_sizes:
            row = results.add(Row("ours", variant, dtype, b, load_s=load_s, first_call_s=warmup_s))
            calls = load.calls if load else 0
            try:
                measure_batch(restorer, stream, faces[:b], reference, row, args, device)
            except torch.OutOfMemoryError:
                row.note = "out of memory"
                logger.warning("ours %s %s batch %d: out of memory", variant, dtype, b)
                break
            except Exception as exc:
                logger.exception("ours %s %s batch %d failed", variant, dtype, b)
                row.note = failure(exc)
                break
            finally:
                if load:
                    row.note = f"{row.note} beside {load.calls - calls} detector-like calls".strip()
                results.save()
            logger.info("ours %s %s batch %d: %.1f ms/face", variant, dtype, b, row.total * 1e3)
    # the caller frees the memory once this frame is gone


def measure_batch(
    restorer: OSDFaceRestorer, stream: torch.cuda.Stream | None, x: torch.Tensor,
    reference: torch.Tensor | None, row: Row, args, device: torch.device,
) -> None:  # fmt: skip
    """One batch size: the first call (parity against fp32), warm-up calls, timed calls."""

    def call():
        with on_stream(stream):
            return restorer(x)

    reset_peak(device)
    first = call()
    if reference is not None:
        row.psnr_db = psnr(first.images[:1], reference)
    for _ in range(args.warmup - 1):
        call()
    row.stages, row.total, row.cpu = timed_runs(call, args.repeats, x.shape[0], device)
    row.peak_gib = peak_gib(device)
    failures = restorer.describe()["fast_path"].get("graph_failures")
    if failures:
        row.note = f"eager stages (graph capture failed): {sorted(failures)}"


# --- the run ---------------------------------------------------------------------------------


def guarded(name: str, step: Callable[[], object], on_error: Callable[[str], object], device):
    """Run one step and return its result; an error is logged and handed to `on_error` (which
    reports it), and None returned, so the next step runs. Memory is freed after it, inside
    the guard too: after a sticky CUDA error that fails as well."""
    try:
        return step()
    except Exception as exc:
        logger.exception("%s failed", name)
        on_error(failure(exc))
        return None
    finally:
        try:
            free_memory(device)
        except Exception:
            logger.exception("freeing memory after %s failed", name)


def plan(args) -> list[tuple[str, str]]:
    """The steps in order: the configurations as given, compile ones last; a start-up of the
    first fast configuration after the others unless one is placed (`startup:DTYPE`)."""
    steps = [c for c in args.configs if c[0] != "compile"]
    if not any(v == "startup" for v, _ in steps):
        steps += [("startup", d) for v, d in steps if v == "fast"][:1]
    if args.no_startup:
        steps = [c for c in steps if c[0] != "startup"]
    return steps + [c for c in args.configs if c[0] == "compile"]


def measure_all(args, device: torch.device, weights: Path, results: Results) -> None:
    """The baseline (or a plain fp32 reference), then each step of `plan`; fills `results`."""
    size = json.loads((weights / "osdface/config.json").read_text())["image_size"]
    faces = sample_faces(max(args.batch_sizes + args.compile_batch_sizes), size)
    reference = None
    if not args.no_baseline:
        step = partial(run_baseline, weights, device, faces[:1], args, results)
        failed = partial(ours_failed, results, "authors", "float32")  # as a baseline row
        reference = guarded("baseline", step, failed, device)
    if reference is None:
        step = partial(plain_reference, weights, device, faces[:1])
        reference = guarded("fp32 reference", step, lambda note: None, device)
    for variant, dtype in plan(args):
        skipped = results.elapsed() > args.time_budget
        if variant == "startup":
            failed = partial(startup_failed, results, dtype)
            if skipped:
                failed("skipped: time budget")
            else:
                step = partial(run_startup, weights, device, dtype, args, results)
                guarded(f"start-up {dtype}", step, failed, device)
            continue
        if skipped:
            results.add(Row("ours", variant, dtype, 0, note="skipped: time budget"))
            continue
        run_args = args
        if variant == "compile":
            run_args = argparse.Namespace(**{**vars(args), "batch_sizes": args.compile_batch_sizes})
        step = partial(
            run_ours, weights, device, dtype, variant, faces, reference, run_args, results
        )
        failed = partial(ours_failed, results, variant, dtype)
        guarded(f"ours {variant} {dtype}", step, failed, device)


def run_startup(weights: Path, device: torch.device, dtype: str, args, results: Results) -> None:
    injected(args, f"startup:{dtype}")
    results.add_startup(
        {"variant": "fast", "dtype": dtype, **measure_startup(weights, device, dtype, args)}
    )
    logger.info("start-up: %s", results.startups[-1])


def ours_failed(results: Results, variant: str, dtype: str, note: str) -> None:
    impl = "baseline" if variant == "authors" else "ours"
    results.add(Row(impl, variant, dtype, 0, note=note))


def startup_failed(results: Results, dtype: str, note: str) -> None:
    results.add_startup({"variant": "fast", "dtype": dtype, "error": note})


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
        "CUDA stream), nosubpixel (fast without subpixel_upsample), nochannelslast (fast "
        "without channels_last), busy / busynostream (fast beside a detector-like load on the "
        "default stream, with / without the worker's own stream), compile (fast + "
        "torch.compile); startup:DTYPE places the start-up measurement; "
        "default: cpu fast:float32, cuda fast:float16,fast:bfloat16",
    )
    p.add_argument("--batch-sizes", type=_ints, help="default: cpu 1, cuda 1,4,8,16")
    p.add_argument("--compile-batch-sizes", type=_ints, help="for compile configs (default: all)")
    p.add_argument("--repeats", type=int, help="timed runs (default: cpu 2, cuda 20)")
    p.add_argument("--warmup", type=int, help="untimed runs first, >= 1 (default: cpu 1, cuda 3)")
    p.add_argument("--weights-dir", type=Path, help="reuse or create here (default: a temp dir)")
    p.add_argument("--tiny", action="store_true", help="tiny weights: to try the harness quickly")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-startup", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds (default 180)")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--threads", type=int, help="CPU intra-op threads for the fast path")
    p.add_argument(
        "--time-budget",
        type=float,
        default=float("inf"),
        help="seconds from the start; steps not started by then are skipped",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    p.add_argument("--json", type=Path, help="also write the raw numbers here (after every row)")
    p.add_argument("--note", default="", help="a line added under the table")
    p.add_argument("--summarize", type=Path, help="print the summary of a --json file and exit")
    p.add_argument(
        "--fail",
        type=lambda text: set(filter(None, text.split(","))),
        default=os.environ.get(FAIL_ENV, ""),
        help=f"steps to fail on purpose, for tests: baseline, VARIANT:DTYPE, startup:DTYPE "
        f"(default: ${FAIL_ENV})",
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    default = [("fast", "float16"), ("fast", "bfloat16")] if cuda else [("fast", "float32")]
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


def finish(results: Results, args) -> None:
    """The JSON first (what must survive), then the table, each on its own."""
    try:
        results.save()
    except Exception:
        logger.exception("could not write %s", args.json)
    try:
        report = format_report(results.env, results.gmacs, results.rows, results.startups, args)
        print("\n" + report)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.write("\n" + report)
    except Exception:
        logger.exception("could not write the report to %s", args.results)
    logger.info("done in %.0f s; appended to %s", results.elapsed(), args.results)


def measure(args, device: torch.device, results: Results) -> None:
    """Weights (written once, reused by a rerun with the same --weights-dir), GMACs, steps."""
    with tempfile.TemporaryDirectory(prefix="osdface-bench-") as tmp:
        weights = ensure_weights(args.weights_dir or Path(tmp) / "weights", tiny=args.tiny)
        try:
            results.gmacs = count_gmacs(weights)
            logger.info("GMACs per face: %s", {k: round(v, 1) for k, v in results.gmacs.items()})
        except Exception:
            logger.exception("counting the GMACs failed")
        measure_all(args, device, weights, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.summarize:
        print(summarize(json.loads(args.summarize.read_text())))
        return 0
    device = torch.device(args.device)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    results = Results(args, environment(device, args))
    status = 0
    try:
        measure(args, device, results)
    except TerminatedError as stop:
        args.note = f"{args.note} Stopped early ({stop}); the last row may be partial.".strip()
        logger.warning("interrupted: reporting what was measured")
    except Exception as exc:
        logger.exception("the benchmark stopped")
        args.note = f"{args.note} Stopped: {failure(exc)}".strip()
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # write first; `timeout -k` ends a hang
        finish(results, args)
        signal.signal(signal.SIGTERM, previous)
    return status


if __name__ == "__main__":
    sys.exit(main())
