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
from pathlib import Path
from types import FrameType
from typing import get_args

import uvicorn
from pydantic import ValidationError

from model.config import DetectorName, Device, DType
from osdface.common import UsageError
from service.settings import Settings, describe_settings_error, env_name, unknown_env_names

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand to the `osdface` parser."""
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--weights", type=Path, help="weights folder (OSDFACE_WEIGHTS_DIR)")
    p.add_argument("--detector", choices=get_args(DetectorName), help="(OSDFACE_DETECTOR)")
    p.add_argument("--host", help="address to bind (OSDFACE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (OSDFACE_PORT, default 8000)")
    p.add_argument("--device", choices=get_args(Device), help="(OSDFACE_DEVICE)")
    p.add_argument("--dtype", choices=get_args(DType), help="(OSDFACE_DTYPE)")
    p.set_defaults(func=run)


# Setting -> the flag that sets it (argparse dest: the flag without its dashes).
FLAGS = {
    "weights_dir": "--weights",
    "detector": "--detector",
    "host": "--host",
    "port": "--port",
    "device": "--device",
    "dtype": "--dtype",
}


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment settings with the given flags on top."""
    flags = {name: getattr(args, flag[2:]) for name, flag in FLAGS.items()}
    return Settings(**{name: value for name, value in flags.items() if value is not None})


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that flips the app to not-ready the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


# Exit statuses of `osdface serve`: 2 = refused to start (settings, weights folder),
# 3 = the model could not be loaded, or its worker died (the log line above says why).
EXIT_USAGE, EXIT_MODEL_FAILED = 2, 3


def _refuse(lines: list[str]) -> int:
    for line in lines:
        sys.stderr.write(f"osdface serve: {line}\n")
    return EXIT_USAGE


def checked_settings(args: argparse.Namespace) -> Settings | list[str]:
    """The settings, or the lines saying what is wrong with the environment or the flags."""
    unknown = unknown_env_names(os.environ)
    if unknown:
        return unknown
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        return [_name_flag(line) for line in describe_settings_error(exc)]
    from osdface.restore.command import check_weights

    try:  # the restorer's files, the detector's and the background networks', as restore does
        check_weights(settings, backgrounds=settings.background_models, has_aligned_flag=False)
    except UsageError as exc:
        return [str(exc)]
    return _port_taken(settings.host, settings.port) or settings


def _name_flag(line: str) -> str:
    """'OSDFACE_PORT: ...' -> '--port / OSDFACE_PORT: ...' for a setting serve has a flag for."""
    for name, flag in FLAGS.items():
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
    if not isinstance(checked, Settings):
        return _refuse(checked)
    settings = checked
    from service.app import create_app  # imports torch; keep `osdface --help` fast
    from service.protocol import GuardedH11Protocol

    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,  # one process owns the device; batching happens inside it
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        server_header=False,
        lifespan="on",
        http=GuardedH11Protocol.with_headers_timeout(settings.headers_timeout_s),
    )
    service = app.state.service
    server = _DrainingServer(config, on_exit=service.begin_drain)
    failed: list[str] = []

    def fatal(reason: str) -> None:  # any thread: uvicorn polls should_exit
        failed.append(reason)
        server.should_exit = True

    service.on_fatal = fatal
    # uvicorn logs "Uvicorn running on ..." once it listens (after the model has loaded).
    logger.info("starting on http://%s:%d; loading the model first", settings.host, settings.port)
    server.run()
    return EXIT_MODEL_FAILED if failed else 0
