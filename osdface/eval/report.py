"""The report folder: metrics.json, README.md beside the paper's table, a contact sheet.

metrics.json has one key per metric: {"mean", "count", "std"} (std null for set-level FID),
plus "_run" describing what was scored (folders, restorer, versions, paper table).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.atomic import atomic_path, write_atomic
from osdface.eval.paper import HIGHER_IS_BETTER, LOWER_IS_BETTER, PAPER_TABLES

METRICS_JSON = "metrics.json"
README = "README.md"
CONTACT_SHEET = "contact_sheet.png"
THUMB = 256


def summarise(
    rows: dict[str, dict[str, float]], metrics: list[str], set_level: dict[str, float]
) -> dict[str, dict]:
    """{metric: {mean, count, std}} over the per-image rows, then the set-level values."""
    summary: dict[str, dict] = {}
    for m in metrics:
        values = np.array([r[m] for r in rows.values() if m in r], dtype=np.float64)
        if values.size:
            std = float(values.std(ddof=1)) if values.size > 1 else 0.0
            summary[m] = {"mean": float(values.mean()), "count": int(values.size), "std": std}
    for m, value in set_level.items():
        summary[m] = {"mean": float(value), "count": len(rows), "std": None}
    return summary


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def _arrow(metric: str) -> str:
    return "↓" if metric in LOWER_IS_BETTER else "↑" if metric in HIGHER_IS_BETTER else ""


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}"


def readme_text(summary: dict[str, dict], run: dict, paper_table: str | None) -> str:
    paper = PAPER_TABLES.get(paper_table or "", {})
    lines = ["# OSDFace eval report", ""]
    lines += [f"- {key}: `{value}`" for key, value in run.items() if not isinstance(value, dict)]
    head = "| metric | this run | std | n |" + (f" paper ({paper_table}) |" if paper else "")
    lines += ["", head]
    lines.append("|---|---:|---:|---:|" + ("---:|" if paper else ""))
    for m in [*summary, *[k for k in paper if k not in summary]]:
        s = summary.get(m, {})
        row = f"| {m} {_arrow(m)} | {_num(s.get('mean'))} | {_num(s.get('std'))} | "
        row += f"{s.get('count', 0)} |"
        if paper:
            row += f" {_num(paper.get(m))} |"
        lines.append(row)
    lines += ["", f"Per-image scores: `per_image.csv`. Faces: `{CONTACT_SHEET}`.", ""]
    return "\n".join(lines)


def ranked(rows: dict[str, dict[str, float]]) -> tuple[str, list[str]] | None:
    """(metric, names best first) by LPIPS, else by PSNR; None when neither was scored."""
    for metric, lower_better in (("lpips", True), ("psnr", False)):
        names = [n for n, r in rows.items() if metric in r]
        if names:
            names.sort(key=lambda n: rows[n][metric], reverse=not lower_better)
            return metric, names
    return None


def pick_best_median_worst(names: list[str]) -> list[tuple[str, str]]:
    picks = [("best", names[0]), ("median", names[len(names) // 2]), ("worst", names[-1])]
    seen, out = set(), []
    for label, name in picks:
        if name not in seen:
            seen.add(name)
            out.append((label, name))
    return out


def contact_sheet(
    picks: list[tuple[str, str, float]],
    metric: str,
    columns: list[tuple[str, dict[str, Path | None]]],
    target: Path,
) -> None:
    """One row per pick: its faces side by side (LQ | restored | HQ), captioned.

    picks: (label, name, score); columns: (title, {name: file}) in display order.
    """
    caption = 18
    sheet = Image.new("RGB", (THUMB * len(columns), (THUMB + caption) * len(picks)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, name, score) in enumerate(picks):
        y = row * (THUMB + caption)
        draw.text((4, y + 3), f"{label}: {name}  {metric} {score:.4f}", fill="black")
        for col, (title, files) in enumerate(columns):
            path = files.get(name)
            if path is None:
                continue
            with Image.open(path) as im:
                thumb = im.convert("RGB").resize((THUMB, THUMB), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (col * THUMB, y + caption))
            draw.text((col * THUMB + 4, y + caption + 3), title, fill="white")
    with atomic_path(target) as part:
        sheet.save(part, format="PNG")
