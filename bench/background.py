"""Background super-resolution time per megapixel: prints a markdown table.

Real-ESRGAN networks with random weights are written in the released `.pth` layout and loaded
through the real loader (restricted unpickler, key checks, spandrel); a real photo from the test
assets is resized to each size and upscaled in tiles with the service's settings. `tiny` is the
test architecture (8 features, 1 block); `full` is the released one (64 features, 23 blocks).

    python -m bench.background --arch tiny --sizes 512x512,1024x1024
    python -m bench.background --arch full --sizes 128x128 --nets realesrgan-x4
    python -m bench.background --device cuda --dtype float16 --arch full --sizes 1024x1024
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from model.device import resolve_device, resolve_dtype
from model.networks.background import BackgroundUpscaler, TileSettings, plan_windows
from tests.tiny_realesrgan import write_tiny_realesrgan

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"tiny": {"features": 8, "blocks": 1}, "full": {"features": 64, "blocks": 23}}
DEFAULT_ASSETS = Path(os.environ.get("OSDFACE_TEST_ASSETS", REPO.parent / "shared" / "assets"))
DEFAULT_PHOTO = DEFAULT_ASSETS / "images/gfpgan/whole_imgs/00.jpg"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TileSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--nets", default="realesrgan-x2,realesrgan-x4")
    p.add_argument("--sizes", default="512x512,1024x1024", help="WxH list of input sizes")
    p.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tile", type=int, default=defaults.tile)
    p.add_argument("--overlap", type=int, default=defaults.overlap)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(up: BackgroundUpscaler, rgb: np.ndarray, repeats: int) -> dict[str, float]:
    """Median wall and process-CPU seconds of one upscale at the network's scale."""
    up(rgb, up.scale)  # warm-up: kernels, allocator
    sync(up.device)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        up(rgb, up.scale)
        sync(up.device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tiles = TileSettings(args.tile, args.overlap, args.batch)
    with Image.open(args.photo) as im:
        photo = np.asarray(im.convert("RGB"))
    root = Path(tempfile.mkdtemp(prefix="bench-background-"))
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {device} {dtype}"
    )
    print(f"`python -m bench.background {' '.join(sys.argv[1:])}`\n")
    print("| net | arch | input | windows | s wall | s CPU | s/MP in, wall | s/MP in, CPU ", end="")
    print("| s/MP out, CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.nets.split(","):
        write_tiny_realesrgan(root, name, **ARCHS[args.arch])
        up = BackgroundUpscaler.from_pretrained(root, name, device, dtype, tiles)
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            rgb = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
            t = measure(up, rgb, args.repeats)
            mp = width * height / 1e6
            windows = len(plan_windows(height, width, tiles, up.net.align))
            print(
                f"| {name} | {args.arch} | {width}x{height} | {windows} | {t['wall']:.2f} | "
                f"{t['cpu']:.2f} | {t['wall'] / mp:.2f} | {t['cpu'] / mp:.2f} | "
                f"{t['cpu'] / (mp * up.scale**2):.3f} |"
            )


if __name__ == "__main__":
    main()
