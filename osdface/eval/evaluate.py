"""`osdface eval` end to end: restore, score, FID, report. Arguments checked before any work."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import DEFAULT_WEIGHTS_DIR, Device, DType, LatentMode
from model.errors import InvalidInputError
from osdface.common import plural
from osdface.eval import report
from osdface.eval.files import require_files
from osdface.eval.names import ALL_METRICS, NEEDS_HQ, PER_IMAGE, PYIQA_METRICS
from osdface.eval.paper import PAPER_TABLES
from osdface.eval.run import CSV_NAME, RESTORED_DIR, Pair, pair_images, restore_all, score_all

if TYPE_CHECKING:
    import torch

    from osdface.eval.backends import HTTPBackend, InProcessBackend
    from osdface.eval.scorers import Scorers

# `make venv` installs what serving needs; the eval extra (pinned in requirements-dev.lock) adds
# pyiqa and its networks' packages, and httpx for --url.
INSTALL_EVAL = "install the eval extra (`make dev`, pinned, or `pip install -e '.[eval]'`)"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    lq: Path
    out: Path
    hq: Path | None = None
    weights: Path = DEFAULT_WEIGHTS_DIR
    url: str | None = None
    api_key: str | None = None
    metrics: tuple[str, ...] = ()
    paper_table: str | None = None
    device: Device = "auto"
    dtype: DType = "auto"
    batch_size: int = 4
    latent: LatentMode = "mode"
    fast: bool | None = None  # the restorer's fast path; None: the setting (on by default)


def _need(metrics: list[str]) -> str:
    """'lpips needs' / 'lpips, dists need'."""
    return f"{', '.join(metrics)} {'needs' if len(metrics) == 1 else 'need'}"


def default_metrics(paper_table: str | None, has_hq: bool) -> list[str]:
    """The paper table's metrics (plus PSNR/SSIM with HQ), or every metric that applies."""
    names = list(PAPER_TABLES[paper_table]) if paper_table else list(ALL_METRICS)
    if has_hq and paper_table:
        names = ["psnr", "ssim", *names]
    return [m for m in ALL_METRICS if m in names and (has_hq or m not in NEEDS_HQ)]


def check(options: EvalOptions) -> list[str]:
    """Validate everything cheap first; return the metric list."""
    if options.paper_table and options.paper_table not in PAPER_TABLES:
        raise InvalidInputError(f"--paper-table must be one of {sorted(PAPER_TABLES)}")
    metrics = list(options.metrics) or default_metrics(options.paper_table, options.hq is not None)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise InvalidInputError(f"unknown metrics {unknown}; known: {', '.join(ALL_METRICS)}")
    if options.hq is None and (needs := [m for m in metrics if m in NEEDS_HQ]):
        raise InvalidInputError(f"{_need(needs)} the HQ faces: pass --hq DIR")
    if options.batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    per_image = [m for m in metrics if m in PER_IMAGE]
    fid = [m for m in metrics if m.startswith("fid")]
    pyiqa_based = [m for m in metrics if m in PYIQA_METRICS or m in fid]
    if pyiqa_based and importlib.util.find_spec("pyiqa") is None:
        raise InvalidInputError(f"{_need(pyiqa_based)} pyiqa: {INSTALL_EVAL}")
    if options.url and importlib.util.find_spec("httpx") is None:
        raise InvalidInputError(f"--url needs httpx: {INSTALL_EVAL}")
    needed = per_image + (["fid"] if fid else [])
    require_files(options.weights, needed, ffhq_stats="fid_ffhq" in fid)
    return metrics


def run_eval(options: EvalOptions) -> dict:
    """Restore and score; write the report folder. Returns the metrics.json content."""
    metrics = check(options)
    pairs = pair_images(options.lq, options.hq)
    out = options.out
    if out.resolve() in {options.lq.resolve(), *([options.hq.resolve()] if options.hq else [])}:
        raise InvalidInputError("the report folder must differ from the LQ and HQ folders")
    out.mkdir(parents=True, exist_ok=True)
    restored_dir = out / RESTORED_DIR
    restorer, failed = _restore(pairs, restored_dir, options)
    pairs = [p for p in pairs if p.name not in failed]
    run = {**_describe(options, restorer, len(pairs)), "skipped": failed}
    device = _metric_device(options.device)
    per_image = [m for m in metrics if m in PER_IMAGE]
    rows = score_all(
        pairs,
        restored_dir,
        out / CSV_NAME,
        per_image,
        lambda: _scorers(per_image, options.weights, device),
        options.batch_size,
    )
    set_level = _fid(metrics, options, restored_dir, device)
    scored = {p.name: rows.get(p.name, {}) for p in pairs}
    columns = [m for m in PER_IMAGE if any(m in r for r in scored.values())]  # earlier runs' too
    summary = report.summarise(scored, columns, set_level)
    report.write_json(out / report.METRICS_JSON, {**summary, "_run": run})
    (out / report.README).write_text(report.readme_text(summary, run, options.paper_table))
    _contact_sheet(pairs, rows, restored_dir, out)
    logger.info("report written to %s", out)
    if failed:
        skipped = plural(len(failed), "LQ file")
        raise InvalidInputError(f"{skipped} skipped (see above): {', '.join(failed[:5])}")
    return summary


def _restore(
    pairs: list[Pair], restored_dir: Path, options: EvalOptions
) -> tuple[dict[str, Any], list[str]]:
    """Restore what is missing. Returns the restorer's description (the last run's when
    nothing was left to restore) and the names of the LQ files that could not be read."""
    previous = _previous_run(options.out).get("restorer")
    if previous and all((restored_dir / f"{p.name}.png").is_file() for p in pairs):
        return previous, []  # resumed: nothing left to restore, nothing to load
    backend = _backend(options)
    try:
        description = backend.describe()
        failed = restore_all(pairs, restored_dir, backend, options.batch_size)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    # the restorer goes out of scope here: its memory returns before the metric networks load
    return description, failed


def _previous_run(out: Path) -> dict:
    path = out / report.METRICS_JSON
    return json.loads(path.read_text()).get("_run", {}) if path.is_file() else {}


def _scorers(names: list[str], weights: Path, device: torch.device) -> Scorers:
    from osdface.eval.scorers import Scorers

    return Scorers.build(names, weights, device)


def _backend(options: EvalOptions) -> HTTPBackend | InProcessBackend:
    from osdface.eval.backends import HTTPBackend, in_process

    if options.url:
        return HTTPBackend(options.url, options.api_key, concurrency=options.batch_size)
    return in_process(
        options.weights,
        options.device,
        options.dtype,
        options.latent,
        fast=options.fast,
        batch_size=options.batch_size,
    )


def _metric_device(name: str) -> torch.device:
    from model.device import resolve_device

    return resolve_device(name)


def _fid(
    metrics: list[str], options: EvalOptions, restored: Path, device: torch.device
) -> dict[str, float]:
    wanted = [m for m in metrics if m.startswith("fid")]
    if not wanted:
        return {}
    from osdface.eval.fid import FID

    fid = FID(options.weights, device)
    values = {}
    if "fid_ffhq" in wanted:
        values["fid_ffhq"] = fid.against_ffhq(restored)
    if "fid_hq" in wanted and options.hq is not None:  # check() refuses fid_hq without --hq
        values["fid_hq"] = fid.against_folder(restored, options.hq)
    return values


def _describe(options: EvalOptions, restorer: dict, count: int) -> dict:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "lq": str(options.lq),
        "hq": str(options.hq) if options.hq else None,
        "faces": count,
        "paper_table": options.paper_table,
        "restorer": restorer,
    }


def _contact_sheet(
    pairs: list[Pair], rows: dict[str, dict[str, float]], restored_dir: Path, out: Path
) -> None:
    order = report.ranked({p.name: rows[p.name] for p in pairs if p.name in rows})
    if order is None:
        logger.info("no LPIPS or PSNR scores: no contact sheet")
        return
    metric, names = order
    by_name = {p.name: p for p in pairs}
    picks = [(label, n, rows[n][metric]) for label, n in report.pick_best_median_worst(names)]
    columns: list[tuple[str, dict[str, Path | None]]] = [
        ("LQ", {n: by_name[n].lq for n in names}),
        ("restored", {n: restored_dir / f"{n}.png" for n in names}),
        ("HQ", {n: by_name[n].hq for n in names}),
    ]
    report.contact_sheet(picks, metric, columns, out / report.CONTACT_SHEET)
