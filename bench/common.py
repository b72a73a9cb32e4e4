"""What the benchmark harnesses share: inputs, memory figures, parity, configurations."""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F

from model.device import TORCH_DTYPES
from model.networks.fastpath import FastPathConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
DTYPES = TORCH_DTYPES
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# The restorer's configurations: the plain path, the fast path, and the fast path with one
# setting changed (see `fast_config`). `busy` and `busynostream` run beside a detector-like
# load on the default stream (`DefaultStreamLoad`), with and without the worker's own stream.
VARIANTS = (
    "plain", "fast", "overlap", "nosubpixel", "nochannelslast", "busy", "busynostream", "compile"
)  # fmt: skip
BUSY = ("busy", "busynostream")


def sample_faces(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float32 in [0, 1]: smooth random images (random weights make real
    faces no more telling), the same for every configuration."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 16, size // 16, generator=g)
    fine = torch.rand(n, 3, size, size, generator=g)
    up = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (0.85 * up + 0.15 * fine).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [0, 1] images; inf when identical."""
    mse = F.mse_loss(a.double(), b.double()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Resets the kernel's peak resident set (VmHWM) to the current one (Linux).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform == "linux":
        # Give freed heap pages back to the OS, so the next configuration's peak resident set
        # does not count memory the previous one freed.
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """True fp32 on CUDA for the parity reference (PyTorch lets cuDNN use TF32 by default)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class DefaultStreamLoad:
    """A thread doing what the service's GPU face detector does beside the model: convolutions
    on a photo-sized input on the default stream, each result copied to the host (`.cpu()`
    waits for that stream). Without the worker's own stream, the model's kernels queue on the
    same stream, and each copy waits for the model's batch in flight (and the model for it)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls = device, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="default-stream-load", daemon=True)

    def __enter__(self) -> DefaultStreamLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @torch.inference_mode()
    def _run(self) -> None:
        g = torch.Generator().manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, 2, 1),
        ).to(self.device)  # fmt: skip
        photo = torch.rand(1, 3, 960, 1280, generator=g).to(self.device)  # (1, 3, H, W)
        while not self._stop.is_set():
            net(photo).amax().cpu()
            self.calls += 1


def fast_config(variant: str, args) -> FastPathConfig | None:
    if variant == "plain":
        return None
    return FastPathConfig(
        batch_sizes=tuple(args.batch_sizes),
        compile=variant == "compile",
        overlap=variant == "overlap",
        subpixel_upsample=variant != "nosubpixel",
        channels_last=variant != "nochannelslast",
        worker_stream=variant != "busynostream",
        compile_mode=args.compile_mode,
        num_threads=args.threads,
    )


def environment(device: torch.device, args) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
        ]
        name = models[0] if models else platform.processor()
        name += f", {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "command": " ".join(["python", "-m", f"bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]]),
    }


def parse_configs(text: str) -> list[tuple[str, str]]:
    """`fast:float32,compile:bfloat16` -> [("fast", "float32"), ("compile", "bfloat16")];
    `startup:DTYPE` stands for the start-up of the fast path in that dtype, at that place."""
    configs = []
    for item in text.split(","):
        variant, _, dtype = item.partition(":")
        if variant not in (*VARIANTS, "startup") or dtype not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"{item!r}: want VARIANT:DTYPE of {(*VARIANTS, 'startup')} x {tuple(DTYPES)}"
            )
        configs.append((variant, dtype))
    return configs
