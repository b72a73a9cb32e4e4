"""`osdface` command line: weights, restore, serve, train, eval."""

from __future__ import annotations

import argparse
import logging
import sys

from osdface import __version__, restore, serve, train, weights
from osdface import eval as evaluate

logger = logging.getLogger("osdface")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from model.errors import OSDFaceError

    try:
        return int(args.func(args) or 0)
    except OSDFaceError as e:
        logger.error("%s", e)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osdface", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands")
    for register in (
        weights.register,
        restore.register,
        serve.register,
        train.register,
        evaluate.register,
    ):
        register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
