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

    python bench/model.py --device cpu
    python bench/model.py --device cuda --configs fast:bfloat16,fast:float16 --batch-sizes 1,4,8,16
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # Run as a script, this folder comes first on sys.path and this file would shadow the
    # `model` package; the repository root goes there instead.
    sys.path[0] = str(REPO)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

START = time.perf_counter()  # for the start-up child: time to here is interpreter start-up

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.baseline import AuthorsStyleBaseline  # noqa: E402
from bench.fullsize import ensure_weights  # noqa: E402
from model.fastpath.core import FastPathConfig  # noqa: E402
from model.restorer import STAGES, OSDFaceRestorer  # noqa: E402

logger = logging.getLogger("bench")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
VARIANTS = ("plain", "fast", "overlap", "nosubpixel", "compile")
RESULTS = REPO / "bench" / "RESULTS.md"


# --- inputs, memory, parity ------------------------------------------------------------------


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


# --- GMACs -----------------------------------------------------------------------------------


def count_gmacs(weights: Path) -> dict[str, float]:
    """GMACs per face and stage at batch 1, counted on the meta device (no compute, no memory).

    `attention` is the part of the total spent in the attention products (QK^T and AV).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from model.config import OSDFaceConfig
    from model.vre import VisualRepresentationEmbedder

    config = OSDFaceConfig.load(weights / "osdface")
    s = config.image_size
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(weights / "sd21-base/unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(weights / "sd21-base/vae"))
        vre = VisualRepresentationEmbedder(config.vre)
        x = torch.zeros(1, 3, s, s)
        z = torch.zeros(1, vae.config.latent_channels, s // 8, s // 8)
        prompt = torch.zeros(1, config.vre.num_tokens, config.vre.prompt_dim)
        t = torch.tensor([config.timestep])
    stages: dict[str, Callable[[], object]] = {
        "vre": lambda: vre(x),
        "vae_encode": lambda: vae.encode(x).latent_dist.mode(),
        "unet": lambda: unet(z, t, encoder_hidden_states=prompt),
        "vae_decode": lambda: vae.decode(z),
    }
    out, attention = {}, 0.0
    with torch.inference_mode():
        for name, fn in stages.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            out[name] = counter.get_total_flops() / 2e9
            ops = counter.get_flop_counts().get("Global", {})
            attention += sum(
                v for k, v in ops.items() if "bmm" in str(k) or "dot_product" in str(k)
            )
    out["total"] = sum(out[k] for k in STAGES)
    out["attention"] = attention / 2e9
    # The fast path's subpixel upsampling computes the same layers with fewer products.
    from model.fastpath.upsample import use_subpixel_upsampling

    use_subpixel_upsampling(unet)
    use_subpixel_upsampling(vae)
    with torch.inference_mode():
        for name in ("unet", "vae_decode"):
            with FlopCounterMode(display=False) as counter:
                stages[name]()
            out[f"{name}_subpixel"] = counter.get_total_flops() / 2e9
    out["total_subpixel"] = out["total"] + sum(
        out[f"{k}_subpixel"] - out[k] for k in ("unet", "vae_decode")
    )
    return out


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Row:
    """One configuration at one batch size; seconds are per face, medians over repeats."""

    impl: str  # "baseline" or "ours"
    variant: str  # "authors" or one of VARIANTS
    dtype: str
    batch: int
    stages: dict[str, float] = field(default_factory=dict)
    total: float = float("nan")
    cpu: float = float("nan")  # process CPU seconds per face, all threads: the host's work
    peak_gib: float = float("nan")
    psnr_db: float | None = None
    first_call_s: float = float("nan")  # warm-up call: autotuning, graph capture, compilation
    load_s: float = float("nan")
    note: str = ""

    @property
    def faces_per_s(self) -> float:
        return 1.0 / self.total if self.total > 0 else float("nan")


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
    baseline = AuthorsStyleBaseline(weights, device)
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


def fast_config(variant: str, args) -> FastPathConfig | None:
    if variant == "plain":
        return None
    return FastPathConfig(
        batch_sizes=tuple(args.batch_sizes),
        compile=variant == "compile",
        overlap=variant == "overlap",
        subpixel_upsample=variant != "nosubpixel",
        compile_mode=args.compile_mode,
        num_threads=args.threads,
    )


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
            failures = restorer.fast.describe().get("graph_failures")
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
        sys.executable, str(Path(__file__).resolve()), "--startup-child",
        "--weights-dir", str(weights), "--device", str(device), "--configs", f"{variant}:{dtype}",
        "--batch-sizes", ",".join(map(str, args.batch_sizes)),
        "--compile-mode", args.compile_mode,
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
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
    """Runs in the fresh process of `measure_startup`; prints READY and its breakdown."""
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
        "import_s": imported - START,
        "load_s": loaded - imported,
        "warmup_s": done - loaded,
    }
    print("READY " + json.dumps(breakdown), flush=True)


# --- report ----------------------------------------------------------------------------------


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
        "command": " ".join(["python", "bench/model.py", *sys.argv[1:]]),
    }


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e3:,.1f}"


def _ratio(a: float, b: float) -> str:
    return "-" if not (a == a and b == b and b > 0) else f"{a / b:.2f}x"


def format_report(env: dict, gmacs: dict, rows: list[Row], startups: list[dict], args) -> str:
    base = next((r for r in rows if r.impl == "baseline"), None)
    head = (
        "| impl | dtype | batch | VRE | VAE enc | UNet | VAE dec | total ms/face | faces/s "
        "| TFLOP/s | CPU s/face | peak GiB | PSNR dB | first call s |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        name = r.impl if r.impl == "baseline" else f"ours ({r.variant})"
        psnr_text = "-" if r.psnr_db is None else f"{r.psnr_db:.1f}"
        tflops = 2 * gmacs["total"] / 1e3 / r.total if r.total == r.total else float("nan")
        lines.append(
            f"| {name} | {SHORT[r.dtype]} | {r.batch} | "
            + " | ".join(_ms(r.stages.get(k, float("nan"))) for k in STAGES)
            + f" | {_ms(r.total)} | {r.faces_per_s:.2f} | {tflops:.2f} | {r.cpu:.2f} "
            f"| {r.peak_gib:.2f} "
            f"| {psnr_text} | {r.first_call_s:.1f} |" + (f" {r.note}" if r.note else "")
        )
        if base is not None and r is not base and r.total == r.total:
            ratios = [_ratio(r.stages[k], base.stages[k]) for k in STAGES]
            total = _ratio(r.total, base.total)
            speed = _ratio(r.faces_per_s, base.faces_per_s)
            cpu = _ratio(r.cpu, base.cpu)
            memory = _ratio(r.peak_gib, base.peak_gib)
            lines.append(
                f"| ours/baseline | | | {' | '.join(ratios)} | **{total}** | {speed} | "
                f"| {cpu} | {memory} | | |"
            )
    g = gmacs
    out = [
        f"### {env['date']}: {env['device']}",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, Python {env['python']}; "
        f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}; `{env['command']}`",
        "",
        f"GMACs per face (flop counter, 512x512): VRE {g['vre']:.0f}, VAE encoder "
        f"{g['vae_encode']:.0f}, UNet {g['unet']:.0f}, VAE decoder {g['vae_decode']:.0f}; total "
        f"{g['total']:,.0f}, of which attention products {g['attention']:.0f} "
        f"({g['total'] - g['attention']:,.0f} without them). The fast path's subpixel "
        f"upsampling does {g['total_subpixel']:,.0f} of them (UNet {g['unet_subpixel']:.0f}, "
        f"VAE decoder {g['vae_decode_subpixel']:.0f}); TFLOP/s counts {g['total']:,.0f} for all.",
        "",
        f"Median of {args.repeats} runs after {args.warmup} warm-up; stage columns are ms per "
        "face (VRE and VAE encode run concurrently on CUDA when `overlap` is on); CPU s/face "
        "is the process's CPU time (all threads); PSNR against fp32.",
        "",
        *lines,
    ]
    if startups:
        out += [
            "",
            "| start-up | dtype | ready s | import s | load s | warm-up s |",
            "|---|---|---|---|---|---|",
        ]
        for s in startups:
            if "error" in s:
                out.append(f"| {s['variant']} | {SHORT[s['dtype']]} | {s['error']} | | | |")
                continue
            times = " | ".join(f"{s[k]:.1f}" for k in ("ready_s", "import_s", "load_s", "warmup_s"))
            out.append(f"| {s['variant']} | {SHORT[s['dtype']]} | {times} |")
    fast = dataclasses.asdict(fast_config("fast", args))
    out += ["", f"Fast-path settings: `{json.dumps(fast)}`"]
    if args.note:
        out += ["", args.note]
    return "\n".join(out) + "\n"


def summarize(payload: dict) -> str:
    """A few lines against the issue's targets, from the `--json` file of a run."""
    rows = [r for r in payload["rows"] if r["batch"] and r["total"] == r["total"]]
    base = next((r for r in rows if r["impl"] == "baseline"), None)
    cuda = payload["env"]["device"].startswith("cuda")
    lines = [f"{payload['env']['device']}; torch {payload['env']['torch']}"]
    if base:
        lines.append(f"baseline fp32 batch 1: {base['total'] * 1e3:,.1f} ms/face")
    for variant, dtype in dict.fromkeys(
        (r["variant"], r["dtype"]) for r in rows if r["impl"] == "ours"
    ):
        mine = sorted((r for r in rows if (r["variant"], r["dtype"]) == (variant, dtype)),
                      key=lambda r: r["batch"])  # fmt: skip
        one, big = mine[0], mine[-1]
        text = (
            f"ours {variant} {SHORT[dtype]}: batch {one['batch']} {one['total'] * 1e3:,.1f} ms/face"
        )
        if base:
            ratio = one["total"] / base["total"]
            goal = 0.3 if cuda else 0.75
            verdict = "met" if ratio <= goal else "MISSED"
            text += f" ({ratio:.2f}x baseline, target <= {goal}x: {verdict})"
        if cuda and dtype != "float32" and one["batch"] == 1:
            text += f"; <= 20 ms: {'met' if one['total'] <= 0.02 else 'MISSED'}"
        fps = 1 / big["total"]
        text += f"; batch {big['batch']} {fps:,.1f} faces/s"
        if cuda and big["batch"] >= 16:
            text += f" (>= 80: {'met' if fps >= 80 else 'MISSED'})"
        psnrs = [r["psnr_db"] for r in mine if r["psnr_db"] is not None]
        if psnrs:
            text += f"; PSNR vs fp32 >= {min(psnrs):.1f} dB"
        lines.append(text)
    for r in payload["rows"]:
        if r["note"]:
            lines.append(f"ours {r['variant']} {SHORT[r['dtype']]} batch {r['batch']}: {r['note']}")
    for st in payload["startups"]:
        if "ready_s" in st:
            verdict = ("met" if st["ready_s"] <= 30 else "MISSED") if cuda else "reported"
            lines.append(f"start-up {st['variant']} {SHORT[st['dtype']]}: {st['ready_s']:.1f} s "
                         f"to ready (target <= 30 s on GPU: {verdict})")  # fmt: skip
        else:
            lines.append(f"start-up: {st.get('error')}")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def parse_configs(text: str) -> list[tuple[str, str]]:
    """`fast:float32,compile:bfloat16` -> [("fast", "float32"), ("compile", "bfloat16")]."""
    configs = []
    for item in text.split(","):
        variant, _, dtype = item.partition(":")
        if variant not in VARIANTS or dtype not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"{item!r}: want VARIANT:DTYPE of {VARIANTS} x {tuple(DTYPES)}"
            )
        configs.append((variant, dtype))
    return configs


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
    p.add_argument("--startup-child", action="store_true", help=argparse.SUPPRESS)
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
    if args.startup_child:
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
