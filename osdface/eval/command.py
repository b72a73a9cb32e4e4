"""`osdface eval`: the paper's quality metrics on a set of aligned faces, and its helpers.

    osdface eval --lq DIR [--hq DIR] [--weights D | --url URL] -o REPORT
    osdface eval degrade --hq DIR -o DIR [--seed N]
    osdface eval compare A/ B/

Arguments and weight files are checked before torch is imported or anything is restored.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import get_args

from model.config import DEFAULT_WEIGHTS_DIR, Device, DType
from osdface.common import default_weights_dir

logger = logging.getLogger(__name__)

PAPER_TABLES = ("celeba-test", "wider", "lfw", "webphoto")
# argparse would end the usage with a required-looking `{degrade,compare} ...`: scoring takes
# no sub-command, so the usage lists the three forms.
USAGE = """
  %(prog)s --lq DIR -o REPORT [--hq DIR] [--weights DIR | --url URL] [options]
  %(prog)s degrade --hq DIR -o DIR [--seed N]
  %(prog)s compare A B [--json]"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score restorations with the paper's metrics (docs/eval.md)",
        usage=USAGE,
    )
    p.add_argument("--lq", type=Path, help="folder of aligned 512x512 low-quality faces")
    p.add_argument("--hq", type=Path, help="folder of the HQ faces (same file stems)")
    p.add_argument("-o", "--output", type=Path, help="report folder (re-running resumes)")
    p.add_argument(
        "--weights",
        type=Path,
        default=default_weights_dir(),
        help=f"weights (default: $OSDFACE_WEIGHTS_DIR, else {DEFAULT_WEIGHTS_DIR})",
    )
    p.add_argument("--url", help="score a running service instead, e.g. http://host:8000")
    p.add_argument("--api-key", help="for --url (default: $OSDFACE_API_KEY)")
    p.add_argument(
        "--metrics", help="comma list, e.g. psnr,ssim,lpips (default: the paper table's)"
    )
    p.add_argument("--paper-table", choices=PAPER_TABLES, help="the paper's values beside yours")
    p.add_argument(
        "--device",
        choices=get_args(Device),
        default="auto",
        help="restorer and metric networks (auto)",
    )
    p.add_argument("--dtype", choices=get_args(DType), default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="faces per batch (4)")
    p.add_argument("--latent", choices=("mode", "sample"), default="mode", help="VAE latent (mode)")
    p.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the restorer's fast path in process, as `osdface restore` runs it (default: on, "
        "env OSDFACE_FAST_PATH); metrics.json states which ran",
    )
    p.set_defaults(func=_eval, eval_parser=p)
    # prog named here: argparse would otherwise build it from the three-line usage above.
    esub = p.add_subparsers(title="eval commands", metavar="{degrade,compare}", prog="osdface eval")

    d = esub.add_parser("degrade", help="synthetic LQ faces, CelebA-Test protocol")
    d.add_argument("--hq", type=Path, required=True, help="folder of aligned 512 HQ faces")
    d.add_argument("-o", "--output", type=Path, required=True, help="folder for the LQ faces")
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the degradations; the same seed gives the "
        "same LQ set, and a folder made with another seed is refused (default: 0)",
    )
    d.set_defaults(func=_degrade)

    c = esub.add_parser("compare", help="per-metric deltas B - A with bootstrap intervals")
    c.add_argument("a", type=Path, help="report folder A")
    c.add_argument("b", type=Path, help="report folder B")
    c.add_argument(
        "--resamples", type=int, default=2000, help="bootstrap resamples per metric (default: 2000)"
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=_compare)


def _eval(args: argparse.Namespace) -> int:
    if args.lq is None or args.output is None:
        args.eval_parser.error("--lq and -o/--output are required")
    from osdface.eval.evaluate import EvalOptions, run_eval

    metrics = tuple(m.strip().lower() for m in (args.metrics or "").split(",") if m.strip())
    options = EvalOptions(
        lq=args.lq,
        out=args.output,
        hq=args.hq,
        weights=args.weights,
        url=args.url,
        api_key=args.api_key or os.environ.get("OSDFACE_API_KEY"),
        metrics=metrics,
        paper_table=args.paper_table,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        latent=args.latent,
        fast=args.fast,
    )
    summary = run_eval(options)
    for name, value in summary.items():
        logger.info("%-9s %.5g (n=%d)", name, value["mean"], value["count"])
    return 0


def _degrade(args: argparse.Namespace) -> int:
    from osdface.eval.degrade import degrade_folder

    written = degrade_folder(args.hq, args.output, seed=args.seed)
    logger.info("%d LQ faces written to %s", len(written), args.output)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from osdface.eval.compare import compare_runs, format_table, to_json

    deltas = compare_runs(args.a, args.b, resamples=args.resamples, seed=args.seed)
    print(to_json(deltas) if args.json else format_table(deltas))  # noqa: T201 - the output
    return 0
