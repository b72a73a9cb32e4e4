"""The benchmark's record and table: rows per configuration and batch size, the JSON kept after
every row, the markdown table and the summary against the targets."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

from bench.common import SHORT, fast_config
from model.atomic import write_atomic
from model.networks.restorer import STAGES


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


@dataclass
class Results:
    """What the run has measured so far. `save` rewrites the `--json` file with it after every
    row, so a run killed at any point leaves what it had."""

    args: argparse.Namespace
    env: dict
    began: float = field(default_factory=time.perf_counter)
    gmacs: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    startups: list[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.save()
        return row

    def add_startup(self, startup: dict) -> None:
        self.startups.append(startup)
        self.save()

    def save(self) -> None:
        if self.args.json is None:
            return
        rows = [dataclasses.asdict(r) for r in self.rows]
        payload = {"env": self.env, "gmacs": self.gmacs, "rows": rows, "startups": self.startups,
                   "note": self.args.note, "elapsed_s": self.elapsed()}  # fmt: skip
        write_atomic(self.args.json, (json.dumps(payload, indent=2, default=float) + "\n").encode())


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e3:,.1f}"


def _ratio(a: float, b: float) -> str:
    return "-" if not (a == a and b == b and b > 0) else f"{a / b:.2f}x"


def format_report(env: dict, gmacs: dict, rows: list[Row], startups: list[dict], args) -> str:
    """The markdown table; failed or skipped rows (the baseline's too) show their note."""
    base = next((r for r in rows if r.impl == "baseline" and r.total == r.total), None)
    head = (
        "| impl | dtype | batch | VRE | VAE enc | UNet | VAE dec | total ms/face | faces/s "
        "| TFLOP/s | CPU s/face | peak GiB | PSNR dB | warm-up s |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        name = r.impl if r.impl == "baseline" else f"ours ({r.variant})"
        psnr_text = "-" if r.psnr_db is None else f"{r.psnr_db:.1f}"
        tflops = 2 * gmacs.get("total", math.nan) / 1e3 / r.total if r.total > 0 else math.nan
        lines.append(
            f"| {name} | {SHORT[r.dtype]} | {r.batch} | "
            + " | ".join(_ms(r.stages.get(k, float("nan"))) for k in STAGES)
            + f" | {_ms(r.total)} | {r.faces_per_s:.2f} | {tflops:.2f} | {r.cpu:.2f} "
            f"| {r.peak_gib:.2f} "
            f"| {psnr_text} | {r.first_call_s:.1f} |" + (f" {r.note}" if r.note else "")
        )
        if base is not None and r is not base and r.total == r.total:
            ratios = [
                _ratio(r.stages.get(k, math.nan), base.stages.get(k, math.nan)) for k in STAGES
            ]
            total = _ratio(r.total, base.total)
            speed = _ratio(r.faces_per_s, base.faces_per_s)
            cpu = _ratio(r.cpu, base.cpu)
            memory = _ratio(r.peak_gib, base.peak_gib)
            lines.append(
                f"| ours/baseline | | | {' | '.join(ratios)} | **{total}** | {speed} | "
                f"| {cpu} | {memory} | | |"
            )
    out = [
        f"### {env['date']}: {env['device']}",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, Python {env['python']}; "
        f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}; `{env['command']}`",
        "",
        _gmacs_line(gmacs),
        "",
        f"Median of {args.repeats} runs after {args.warmup} warm-up; stage columns are ms per "
        "face (VRE and VAE encode run concurrently on CUDA when `overlap` is on); CPU s/face "
        "is the process's CPU time (all threads); PSNR against fp32; warm-up s is the "
        "configuration's `warmup()` (cuDNN autotuning, graph capture, compilation), the "
        "baseline's first call.",
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


def _gmacs_line(g: dict) -> str:
    if not g:
        return "GMACs per face: not counted (see the log)."
    return (
        f"GMACs per face (flop counter, 512x512): VRE {g['vre']:.0f}, VAE encoder "
        f"{g['vae_encode']:.0f}, UNet {g['unet']:.0f}, VAE decoder {g['vae_decode']:.0f}; total "
        f"{g['total']:,.0f}, of which attention products {g['attention']:.0f} "
        f"({g['total'] - g['attention']:,.0f} without them). The fast path's subpixel "
        f"upsampling does {g['total_subpixel']:,.0f} of them (UNet {g['unet_subpixel']:.0f}, "
        f"VAE decoder {g['vae_decode_subpixel']:.0f}); TFLOP/s counts {g['total']:,.0f} for all."
    )


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
    lines += settled(rows)
    for r in payload["rows"]:
        if r["note"]:
            where = f"{r['impl']} {r['variant']} {SHORT[r['dtype']]} batch {r['batch']}"
            lines.append(f"{where}: {r['note']}")
    for st in payload["startups"]:
        if "ready_s" in st:
            verdict = ("met" if st["ready_s"] <= 30 else "MISSED") if cuda else "reported"
            lines.append(f"start-up {st['variant']} {SHORT[st['dtype']]}: {st['ready_s']:.1f} s "
                         f"to ready (target <= 30 s on GPU: {verdict})")  # fmt: skip
        else:
            lines.append(f"start-up: {st.get('error')}")
    return "\n".join(lines)


# Settings only a GPU run can settle: (setting, variant with it on, variant with it off).
SETTLED_BY_GPU = (
    ("channels_last", "fast", "nochannelslast"),
    ("worker_stream", "busy", "busynostream"),
    ("overlap", "overlap", "fast"),
    ("subpixel_upsample", "fast", "nosubpixel"),
)


def settled(rows: list[dict]) -> list[str]:
    """For each setting of SETTLED_BY_GPU measured both ways in one dtype: ms per face with it
    on over off at each batch size (below 1: on is faster)."""
    by = {(r["variant"], r["dtype"], r["batch"]): r["total"] for r in rows if r["impl"] == "ours"}
    lines = []
    for setting, on, off in SETTLED_BY_GPU:
        for dtype in dict.fromkeys(d for v, d, _ in by if v == on):
            batches = sorted(b for v, d, b in by if (v, d) == (on, dtype) and (off, d, b) in by)
            ratios = [by[on, dtype, b] / by[off, dtype, b] for b in batches]
            if ratios:
                each = ", ".join(
                    f"{x:.2f}x at batch {b}" for x, b in zip(ratios, batches, strict=True)
                )
                verdict = (
                    "on is faster"
                    if max(ratios) < 1
                    else "off is faster"
                    if min(ratios) > 1
                    else "mixed"
                )
                lines.append(f"{setting} {SHORT[dtype]}: on/off ms per face {each} ({verdict})")
    return lines
