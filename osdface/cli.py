"""`osdface` command line: weights, restore, serve, train, eval."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from model.runtime.messages import did_you_mean
from osdface import __version__, serve, train, weights
from osdface.common import UsageError
from osdface.eval import command as evaluate
from osdface.restore import command as restore
from osdface.restore import foreign
from osdface.restore.flags import explain_parse_error

logger = logging.getLogger("osdface")
# Libraries whose warnings are about their own optional parts, never about the user's run
# (bitsandbytes, a training extra imported through peft, misses an optional CPU kernel).
QUIET_LIBRARIES = ("bitsandbytes",)
# Libraries that log a line per HTTP request at INFO (`osdface eval --url`: one per face):
# warnings only, unless -v.
CHATTY_LIBRARIES = ("httpx", "httpcore")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run failed (or some files did), 2 usage: nothing was started."""
    parser, args = parse(sys.argv[1:] if argv is None else argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in () if verbose else QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in () if verbose else CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for note in getattr(args, "spelling_notes", ()):  # another tool's flag, taken: said once
        logger.warning("%s", note)
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


class _Parser(argparse.ArgumentParser):
    """argparse's parser; an error about an old form of a flag says what to write now."""

    def error(self, message: str) -> NoReturn:
        super().error(explain_parse_error(message))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; for a `command` other than serve, serve's flags are left out (they
    come from the service's settings, which the other commands never import)."""
    parser = _Parser(prog="osdface", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands")
    serving = serve.register if command in (None, "serve") else serve.register_name
    for register in (
        weights.register,
        restore.register,
        serving,
        train.register,
        evaluate.register,
    ):
        register(sub)
    _mark_commands(parser)
    return parser


def parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser and the parsed arguments; a usage error exits (2) with the usage of the
    command the arguments were given to."""
    command = _command(argv)
    parser = build_parser(command)
    notes: list[str] = []
    if command == "restore":  # GFPGAN's and CodeFormer's flags: taken, or refused in one line
        argv, notes = _foreign_flags(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    unknown = _positionals_anywhere(args, unknown)
    if unknown:  # with the usage of the command they were given to, not the top level's
        command_parser = getattr(args, "command_parser", parser)
        known = [s for a in command_parser._actions for s in a.option_strings]
        hint = did_you_mean(unknown[0].split("=")[0], known) if len(unknown) == 1 else ""
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.spelling_notes = notes
    return parser, args


def _foreign_flags(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """The words after `restore` in our spelling, and the notes to log; a flag of another tool
    that means something else here ends the run with one line (exit 2), not a usage dump."""
    at = argv.index("restore") + 1
    command = _subcommand(parser, "restore")
    known = [s for action in command._actions for s in action.option_strings]
    try:
        translated = foreign.translate(argv[at:], known)
    except UsageError as exc:
        command.exit(2, f"{command.prog}: error: {exc}\n")
    return argv[:at] + translated.argv, translated.notes


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _positionals_anywhere(args: argparse.Namespace, unknown: list[str]) -> list[str]:
    """Words left over after an option (`a.jpg --ray b.jpg`: argparse takes the positionals
    before the first option only) join the positionals of a command that takes them anywhere
    (`positionals_anywhere`: their dest); what is left is unknown."""
    dest = getattr(args, "positionals_anywhere", None)
    if dest is None:
        return unknown
    getattr(args, dest).extend(word for word in unknown if not word.startswith("-"))
    return [word for word in unknown if word.startswith("-")]


def _command(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def _mark_commands(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as a default of its own: the innermost one given wins."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                _mark_commands(command)


if __name__ == "__main__":
    sys.exit(main())
