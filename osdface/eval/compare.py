"""Two eval runs compared: per-metric mean deltas (B - A) with paired bootstrap intervals.

Faces are paired by name (the CSV's `name`); only faces scored in both runs count. The
interval is the percentile bootstrap over faces (resampled with replacement, seeded), so
"fp16 fast path vs fp32" or "new weights vs old" comes with how sure the difference is.
Set-level metrics (FID) have no per-face values: their delta is given without an interval.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import InvalidInputError
from osdface.eval.names import SET_LEVEL
from osdface.eval.report import METRICS_JSON
from osdface.eval.run import CSV_NAME, read_rows


@dataclass(frozen=True)
class Delta:
    metric: str
    a: float
    b: float
    delta: float  # b - a
    low: float | None  # bootstrap interval of the delta; None for set-level metrics
    high: float | None
    count: int


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of mean(b - a) over faces resampled with replacement."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):  # a loop, not one (resamples, n) index array: bounded memory
        means[i] = diff[rng.integers(0, diff.size, diff.size)].mean()
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail))


def compare_runs(run_a: Path, run_b: Path, **bootstrap: Any) -> list[Delta]:
    rows_a, rows_b = _rows(run_a), _rows(run_b)
    names = sorted(set(rows_a) & set(rows_b))
    if not names:
        raise InvalidInputError(f"{run_a} and {run_b} have no scored face in common")
    metrics = [m for m in dict.fromkeys(k for r in rows_a.values() for k in r)]
    deltas = []
    for m in metrics:
        both = [n for n in names if m in rows_a[n] and m in rows_b[n]]
        if not both:
            continue
        a = np.array([rows_a[n][m] for n in both])
        b = np.array([rows_b[n][m] for n in both])
        low, high = paired_bootstrap(a, b, **bootstrap)
        deltas.append(
            Delta(m, float(a.mean()), float(b.mean()), float((b - a).mean()), low, high, len(both))
        )
    sum_a, sum_b = _summary(run_a), _summary(run_b)
    for m in SET_LEVEL:
        if m in sum_a and m in sum_b:
            a, b = sum_a[m]["mean"], sum_b[m]["mean"]
            deltas.append(Delta(m, a, b, b - a, None, None, sum_b[m]["count"]))
    return deltas


def format_table(deltas: list[Delta], level: float = 0.95) -> str:
    head = f"{'metric':10s} {'A':>12s} {'B':>12s} {'B-A':>12s}  {int(level * 100)}% interval"
    lines = [head]
    for d in deltas:
        interval = "" if d.low is None else f"[{d.low:+.5g}, {d.high:+.5g}]"
        lines.append(f"{d.metric:10s} {d.a:12.5g} {d.b:12.5g} {d.delta:+12.5g}  {interval}")
    return "\n".join(lines)


def to_json(deltas: list[Delta]) -> str:
    return json.dumps({d.metric: asdict(d) for d in deltas}, indent=2)


def _rows(run: Path) -> dict[str, dict[str, float]]:
    path = Path(run) / CSV_NAME
    if not path.is_file():
        raise InvalidInputError(f"{path} not found: is {run} an `osdface eval` report folder?")
    return read_rows(path)


def _summary(run: Path) -> dict:
    path = Path(run) / METRICS_JSON
    return json.loads(path.read_text()) if path.is_file() else {}
