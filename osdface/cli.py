"""`osdface` command line: weights, restore, serve, train, eval."""

from __future__ import annotations

import argparse
import logging
import sys

from osdface import __version__, serve, train, weights
from osdface.eval import command as evaluate
from osdface.restore import command as restore
from osdface.common import UsageError

logger = logging.getLogger("osdface")
# Libraries whose warnings are about their own optional parts, never about the user's run
# (bitsandbytes, a training extra imported through peft, misses an optional CPU kernel).
QUIET_LIBRARIES = ("bitsandbytes",)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run failed (or some files did), 2 usage: nothing was started."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the usage of the command they were given to, not the top level's
        getattr(args, "command_parser", parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in () if verbose else QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    if getattr(args, "quiet", False) and not verbose:  # -q: warnings, errors, the summary line
        from osdface.restore.reporting import SUMMARY_LOGGER

        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger(SUMMARY_LOGGER).setLevel(logging.INFO)
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
    _mark_commands(parser)
    return parser


def _mark_commands(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as a default of its own: the innermost one given wins."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                _mark_commands(command)


if __name__ == "__main__":
    sys.exit(main())
