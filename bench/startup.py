"""Start-up to ready: a fresh interpreter imports, loads the merged weights and warms up.

`bench/speed.py` spawns this module (`python -m bench.startup ...`) and reads the one line it
prints, `READY {...}`: seconds from the spawn to ready, and their parts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import DTYPES, REPO, fast_config
from model.device import on_stream
from model.networks.restorer import OSDFaceRestorer


def measure_startup(weights: Path, device: torch.device, dtype: str, args) -> dict:
    """The fast path in `dtype`, in a fresh process: {"ready_s", "import_s", "load_s",
    "warmup_s"}; TimeoutError after `args.startup_timeout` seconds."""
    cmd = [
        sys.executable, "-m", "bench.startup", str(time.time()), "--weights-dir", str(weights),
        "--device", str(device), "--dtype", dtype,
        "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--compile-mode", args.compile_mode,
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, timeout=args.startup_timeout
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"not ready in {args.startup_timeout:.0f} s") from None
    ready = [line for line in proc.stdout.splitlines() if line.startswith("READY ")]
    if proc.returncode != 0 or not ready:
        raise RuntimeError(f"exit code {proc.returncode}")
    return json.loads(ready[-1].removeprefix("READY "))


def main(argv: list[str] | None = None) -> int:
    """The child: `spawned` is the wall-clock time the parent spawned it at."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("spawned", type=float)
    p.add_argument("--weights-dir", type=Path, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dtype", choices=tuple(DTYPES), required=True)
    p.add_argument("--batch-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1])
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    import_s = time.time() - args.spawned
    imported = time.perf_counter()
    device = torch.device(args.device)
    restorer = OSDFaceRestorer.from_pretrained(
        args.weights_dir, device, DTYPES[args.dtype], fast=fast_config("fast", args)
    )
    loaded = time.perf_counter()
    with on_stream(restorer.worker_stream()):  # as the service warms up
        restorer.warmup(batch_size=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done = time.perf_counter()
    breakdown = {
        "ready_s": time.time() - args.spawned,
        "import_s": import_s,
        "load_s": loaded - imported,
        "warmup_s": done - loaded,
    }
    print("READY " + json.dumps(breakdown), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
