"""`osdface` command line: weights, restore, serve, train, eval."""

from __future__ import annotations

import argparse
import logging
import sys

from osdface import __version__, restore, serve, train, weights
from osdface import eval as evaluate
from osdface.plan import UsageError

logger = logging.getLogger("osdface")
# Libraries whose warnings are about their own optional parts, never about the user's run
# (bitsandbytes, a training extra imported through peft, misses an optional CPU kernel).
QUIET_LIBRARIES = ("bitsandbytes",)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run failed (or some files did), 2 usage: nothing was started."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in () if verbose else QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from model.errors import OSDFaceError

    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        logger.error("%s", e, exc_info=verbose)
        return 2
    except OSDFaceError as e:
        logger.error("%s", e, exc_info=verbose)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume")
        return 130


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
