"""Paired, interleaved timing of the restorer against the authors'-style baseline.

bench/speed.py times one configuration after another. On a shared machine (a VM whose host
runs other guests) the speed drifts by 10-15% over minutes, so a ratio of two figures taken
minutes apart moves by as much. Here every configuration is loaded and warmed up first, then
the calls take turns, round after round (baseline, config 1, config 2, ...): each round's
ratio compares calls made seconds apart, and the median over rounds is the figure.

Batch 1, full-size random weights in the released layout (bench/fullsize.py), as bench/speed.py.
Every configuration stays loaded: about 6 GiB each in fp32 on the CPU.

    python -m bench.paired --device cpu --configs fast:float32,compile:float32 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.baseline import AuthorsStyleBaseline
from bench.common import (
    DTYPES,
    RESULTS,
    SHORT,
    environment,
    fast_config,
    parse_configs,
    psnr,
    sample_faces,
    strict_fp32,
)
from bench.fullsize import ensure_weights
from model.networks.restorer import STAGES, OSDFaceRestorer

logger = logging.getLogger("bench.paired")


def load_contenders(weights: Path, device: torch.device, face: torch.Tensor, args):
    """Name -> call, baseline first; every one warmed up; plus the fp32 reference image."""
    baseline = AuthorsStyleBaseline.from_weights(weights, device)
    with strict_fp32(device):
        reference = baseline(face, latent="mode").images
    calls: dict[str, Callable] = {"baseline fp32": lambda: baseline(face, latent="sample")}
    parity: dict[str, float] = {}
    for variant, dtype in args.configs:
        name = f"{variant} {SHORT[dtype]}"
        start = time.perf_counter()
        restorer = OSDFaceRestorer.from_pretrained(
            weights, device, DTYPES[dtype], fast=fast_config(variant, args)
        )
        parity[name] = psnr(restorer(face).images, reference)  # also the warm-up call
        logger.info("%s ready in %.1f s, %.1f dB", name, time.perf_counter() - start, parity[name])
        calls[name] = lambda r=restorer: r(face)
    for _ in range(args.warmup - 1):
        for call in calls.values():
            call()
    return calls, parity


def interleaved_rounds(calls: dict[str, Callable], rounds: int, device: torch.device):
    """Per name, a list of (total seconds, stage seconds) per round, calls taking turns."""
    times: dict[str, list[tuple[float, dict]]] = {name: [] for name in calls}
    for r in range(rounds):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = call()
            times[name].append((time.perf_counter() - start, out.timings))
        logger.info(
            "round %d/%d: %s", r + 1, rounds,
            ", ".join(f"{n} {t[-1][0]:.2f} s" for n, t in times.items()),
        )  # fmt: skip
    return times


def report(times: dict, parity: dict[str, float], env: dict, args) -> str:
    base = [t for t, _ in times["baseline fp32"]]
    lines = [
        f"### {env['date']}: {env['device']} (paired rounds)",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}; "
        f"`python -m bench.paired {' '.join(sys.argv[1:])}`",
        "",
        f"Batch 1. {args.rounds} rounds after {args.warmup} warm-up; in each round every "
        "configuration runs once, in turn. Seconds are medians over rounds; the ratio is the "
        "median of each round's ratio to that round's baseline call, with its range.",
        "",
        "| configuration | VRE s | VAE enc s | UNet s | VAE dec s | total s | "
        "vs baseline (median) | range over rounds | PSNR vs fp32 dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in times.items():
        totals = [t for t, _ in runs]
        stages = [statistics.median(s[k] for _, s in runs) for k in STAGES]
        cells = " | ".join(f"{v:.2f}" for v in (*stages, statistics.median(totals)))
        if name == "baseline fp32":
            lines.append(f"| {name} | {cells} | 1.00x | | (reference) |")
            continue
        ratios = [t / b for t, b in zip(totals, base, strict=True)]
        lines.append(
            f"| {name} | {cells} | **{statistics.median(ratios):.2f}x** | "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x | {parity[name]:.1f} |"
        )
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--configs",
        type=parse_configs,
        default=[("fast", "float32")],
        help="VARIANT:DTYPE,... as in bench/speed.py (default: fast:float32)",
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds, >= 1")
    p.add_argument("--weights-dir", type=Path, help="reuse or create here (default: temp dir)")
    p.add_argument("--tiny", action="store_true", help="tiny weights: to try the harness")
    p.add_argument("--threads", type=int, help="CPU intra-op threads for the fast path")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    p.add_argument("--note", default="", help="a line added under the table")
    args = p.parse_args(argv)
    args.batch_sizes = [1]
    if args.rounds < 1 or args.warmup < 1:
        p.error("--rounds and --warmup must be >= 1")
    if any(variant == "startup" for variant, _ in args.configs):
        p.error("startup is a step of bench/speed.py, not a configuration to pair")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="osdface-paired-") as tmp:
        weights = ensure_weights(args.weights_dir or Path(tmp) / "weights", tiny=args.tiny)
        size = json.loads((weights / "osdface/config.json").read_text())["image_size"]
        face = sample_faces(1, size)
        calls, parity = load_contenders(weights, device, face, args)
        times = interleaved_rounds(calls, args.rounds, device)
    text = report(times, parity, environment(device, args), args)
    print(text)
    with args.results.open("a") as f:
        f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
