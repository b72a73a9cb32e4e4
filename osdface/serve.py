"""`osdface serve`: run the HTTP service under uvicorn (one process, one model worker).

Flags override the `OSDFACE_*` environment settings. On SIGTERM or Ctrl-C the server stops
accepting connections and reports not-ready at once, lets running requests finish for up to
OSDFACE_SHUTDOWN_GRACE_S seconds, lets the model worker drain, and exits.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from osdface.common import UsageError, add_field_flag, given, setting_flags

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger(__name__)

HELP = "run the HTTP service"
# (flag, setting, help): the run-time settings' flags as `osdface restore` has them, and the
# service's own. Their defaults and variables come from `service.settings.Settings`.
FLAGS: tuple[tuple[str, str, str], ...] = (
    *setting_flags("weights_dir", "detector"),
    ("--host", "host", "address to bind"),
    ("--port", "port", "port to bind"),
    *setting_flags("device", "dtype"),
    ("--log-format", "log_format", "log lines: json, text, or auto (text on a terminal)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand to the `osdface` parser (this imports the service's settings,
    not the service: `register_name` adds the command without them)."""
    from service.settings import Settings

    p = subparsers.add_parser(
        "serve",
        help=HELP,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, name, text in FLAGS:
        add_field_flag(p, flag, name, Settings.model_fields[name], text, env=True)
    p.set_defaults(func=run)


def register_name(subparsers: argparse._SubParsersAction) -> None:
    """The `serve` command in the list of commands, its flags left out: for a command line that
    runs another command, which need not import the service's settings."""
    subparsers.add_parser("serve", help=HELP)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment settings with the given flags on top."""
    from service.settings import Settings

    return Settings(**given(args, [name for _, name, _ in FLAGS]))


def _draining_server(config: Any, on_exit: Callable[[], None]) -> Any:
    """A uvicorn.Server that flips the app to not-ready the moment a stop signal arrives."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    return DrainingServer(config)


# Exit statuses of `osdface serve`: 2 = refused to start (settings, weights folder),
# 3 = the model could not be loaded, or its worker died (the log line above says why).
EXIT_USAGE, EXIT_MODEL_FAILED = 2, 3


def _refuse(lines: list[str]) -> int:
    for line in lines:
        sys.stderr.write(f"osdface serve: {line}\n")
    return EXIT_USAGE


def checked_settings(args: argparse.Namespace) -> Settings | list[str]:
    """The settings, or the lines saying what is wrong with the environment or the flags."""
    from service.settings import describe_settings_error, unknown_env_names

    unknown = unknown_env_names(os.environ)
    if unknown:
        return unknown
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        return [_name_flag(line) for line in describe_settings_error(exc)]
    from osdface.restore.checks import check_weights

    try:  # the restorer's files, the detector's and the background networks', as restore does
        check_weights(settings, backgrounds=settings.background_models, has_aligned_flag=False)
    except UsageError as exc:
        return [str(exc)]
    return _port_taken(settings.host, settings.port) or settings


def _name_flag(line: str) -> str:
    """'OSDFACE_PORT: ...' -> '--port / OSDFACE_PORT: ...' for a setting serve has a flag for."""
    from service.settings import env_name

    for flag, name, _ in FLAGS:
        if line.startswith(f"{env_name(name)}:"):
            return f"{flag} / {line}"
    return line


def _port_taken(host: str, port: int) -> list[str]:
    """Bind the address once before the model loads (minutes): a port in use is refused now.
    Another process may still take it before uvicorn binds; uvicorn then fails as before."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                # As uvicorn's own socket: a port left in TIME_WAIT by a stopped server is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return [
                f"port {port} on {host} is in use (another server?): stop it, or choose "
                "another with --port / OSDFACE_PORT"
            ]
        return [
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another "
            "--host / OSDFACE_HOST or --port / OSDFACE_PORT"
        ]
    return []


def run(args: argparse.Namespace) -> int:
    checked = checked_settings(args)
    if isinstance(checked, list):
        return _refuse(checked)
    settings = checked
    from service.logs import configure_logging  # before torch's import, which may warn

    configure_logging(settings.log_format, settings.log_level, secrets=[settings.api_key])
    import uvicorn

    from service.app import create_app  # imports torch; keep `osdface --help` fast
    from service.protocol import GuardedH11Protocol

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,  # one process owns the device; batching happens inside it
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines go through the root handler, in the same format
        access_log=False,  # the app writes its own, with request id, bytes and duration
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        server_header=False,
        lifespan="on",
        http=GuardedH11Protocol.with_headers_timeout(settings.headers_timeout_s),
    )
    service = app.state.service
    server = _draining_server(config, on_exit=service.begin_drain)
    failed: list[str] = []

    def fatal(reason: str) -> None:  # any thread: uvicorn polls should_exit
        failed.append(reason)
        server.should_exit = True

    service.on_fatal = fatal
    # uvicorn logs "Uvicorn running on ..." once it listens (after the model has loaded).
    logger.info("starting on http://%s:%d; loading the model first", settings.host, settings.port)
    server.run()
    return EXIT_MODEL_FAILED if failed else 0
