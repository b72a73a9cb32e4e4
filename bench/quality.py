"""Restoration quality per configuration: `osdface eval` on the same faces, each configuration
compared with the first by `osdface eval compare` (mean deltas, paired 95% bootstrap intervals).

    python -m bench.quality --tiny                                   # this machine: the plumbing
    python -m bench.quality --weights W --device cuda --configs float32,bfloat16,float16
    python -m bench.quality --weights W --device cuda --hq celeba/hq --lq celeba/lq \\
        --metrics psnr,ssim,lpips,dists --configs float32,float16 --url http://gpu-box:8000

Faces: `--hq DIR` (aligned 512x512), by default the aligned HQ faces of ../shared/assets, each
copied `--copies` times; `--lq DIR`, by default `osdface eval degrade` of those (CelebA-Test
protocol, seeded: the same LQ set on every run). A configuration is a dtype of the in-process
restorer; `--url` adds a running service (its dtype, fast path and PNG encoding) as one more.
Every run is a fresh `osdface eval` process, as a user runs it; its wall time (loading
included) is reported. The table goes to stdout and is appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.inputs import assets, weights_folder

logger = logging.getLogger("bench.quality")
REPO = Path(__file__).resolve().parents[1]
# Aligned 512x512 faces of good quality among the shared assets (the others are LQ already).
HQ_FACES = (
    "gfpgan/cropped_faces/Adele_crop.png",
    "gfpgan/cropped_faces/Julia_Roberts_crop.png",
    "gfpgan/cropped_faces/Justin_Timberlake_crop.png",
    "gfpgan/cropped_faces/Paris_Hilton_crop.png",
)


@dataclass
class Run:
    name: str
    seconds: float
    faces: int
    means: dict[str, float]
    deltas: dict[str, dict]  # metric -> `eval compare --json` entry; empty for the reference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random weights (tests/tiny_weights)")
    p.add_argument("--weights", type=Path, help="a weights folder (instead of --tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="float32,bfloat16", help="dtypes; the first is A")
    p.add_argument("--url", help="a running service, scored as one more configuration")
    p.add_argument("--hq", type=Path, help="aligned HQ faces (default: the shared assets')")
    p.add_argument("--lq", type=Path, help="their LQ faces (default: eval degrade of --hq)")
    p.add_argument("--copies", type=int, default=3, help="copies of each default HQ face")
    p.add_argument("--metrics", default="psnr,ssim", help="eval's --metrics (psnr,ssim: no files)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--results", type=Path, default=REPO / "bench/RESULTS.md")
    p.add_argument("--note", default="", help="a sentence added to the results section")
    args = p.parse_args(argv)
    if args.tiny == (args.weights is not None):
        p.error("give exactly one of --tiny and --weights")
    if args.lq is not None and args.hq is None:
        p.error("--lq needs --hq: the HQ faces its files are scored against")
    return args


def make_faces(work: Path, copies: int) -> tuple[Path, Path]:
    """(HQ folder, LQ folder): the assets' HQ faces `copies` times, degraded by `eval degrade`."""
    hq, lq = work / "hq", work / "lq"
    hq.mkdir(parents=True)
    for k in range(copies):
        for rel in HQ_FACES:
            source = assets() / "images" / rel
            shutil.copyfile(source, hq / f"{k}_{source.name}")
    osdface("eval", "degrade", "--hq", str(hq), "-o", str(lq), "--seed", "0")
    return hq, lq


def osdface(*argv: str) -> str:
    """Run the command line as a user would; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "osdface", *argv],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def score(name: str, target: list[str], hq: Path, lq: Path, out: Path, args) -> Run:
    """One `osdface eval` run; `target` says what restores (--weights/--dtype, or --url)."""
    start = time.perf_counter()
    osdface(
        "eval", "--lq", str(lq), "--hq", str(hq), "-o", str(out), "--metrics", args.metrics,
        "--device", args.device, "--batch-size", str(args.batch_size), *target,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    summary = json.loads((out / "metrics.json").read_text())
    means = {m: v["mean"] for m, v in summary.items() if not m.startswith("_")}
    faces = max((v["count"] for m, v in summary.items() if not m.startswith("_")), default=0)
    return Run(name, seconds, faces, means, {})


def compare(reference: Path, other: Path) -> dict[str, dict]:
    return json.loads(osdface("eval", "compare", str(reference), str(other), "--json"))


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="osdface-quality-bench-"))
    weights = weights_folder(args.weights, args.tiny, work / "weights")
    if args.hq is None:
        hq, lq = make_faces(work / "faces", args.copies)
    else:
        hq, lq = args.hq, args.lq or work / "lq"
        if args.lq is None:
            osdface("eval", "degrade", "--hq", str(hq), "-o", str(lq), "--seed", "0")
    targets = [
        (dtype, ["--weights", str(weights), "--dtype", dtype]) for dtype in args.configs.split(",")
    ]
    if args.url:
        targets.append((f"service {args.url}", ["--url", args.url, "--weights", str(weights)]))
    runs: list[Run] = []
    for k, (name, target) in enumerate(targets):
        out = work / f"report{k}"
        run = score(name, target, hq, lq, out, args)
        if k:
            run.deltas = compare(work / "report0", out)
        runs.append(run)
        logger.info("bench quality %s: %s", name, run.means)
    table = format_table(runs, args, kind="tiny random" if args.tiny else str(weights))
    print(table)  # the benchmark's output
    with args.results.open("a") as f:
        f.write("\n" + table + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return table


def format_table(runs: list[Run], args, kind: str) -> str:
    metrics = list(runs[0].means)
    head = ["configuration", "faces", "wall s"]
    for m in metrics:
        head += [m, f"{m} - A (95% interval)"]
    lines = [
        f"## Quality by configuration ({datetime.now(UTC):%Y-%m-%d}, `python -m bench.quality`)",
        "",
        f"Device {args.device} ({platform.processor() or platform.machine()}); weights: {kind}; "
        f"A = {runs[0].name}; faces: {args.hq or 'shared assets, degraded'}. "
        "Deltas are `osdface eval compare` of each run against A; wall s includes loading."
        + (f" {args.note}" if args.note else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for run in runs:
        cells = [run.name, str(run.faces), f"{run.seconds:.1f}"]
        for m in metrics:
            cells.append(f"{run.means.get(m, float('nan')):.4g}")
            d = run.deltas.get(m)
            if d is None:
                cells.append("A" if run is runs[0] else "n/a")
            elif d["low"] is None:
                cells.append(f"{d['delta']:+.3g}")
            else:
                cells.append(f"{d['delta']:+.3g} ({d['low']:+.3g}, {d['high']:+.3g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
