"""`osdface serve`: run the HTTP service under uvicorn (one process, one model worker).

Flags override the `OSDFACE_*` environment settings. On SIGTERM or Ctrl-C the server stops
accepting connections and reports not-ready at once, lets running requests finish for up to
`shutdown_grace_s`, lets the model worker drain, and exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from types import FrameType
from typing import get_args

import uvicorn
from pydantic import ValidationError

from model.config import DetectorName, Device, DType
from service.settings import Settings, describe_settings_error, unknown_env_names
from weights.layout import WeightsLayout

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


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment settings with the given flags on top."""
    flags = {
        "weights_dir": args.weights,
        "detector": args.detector,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "dtype": args.dtype,
    }
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
        return describe_settings_error(exc)
    return preflight_weights(settings.weights_dir) or settings


def preflight_weights(weights_dir: Path) -> list[str]:
    """What is missing before anything loads: the folder, or the converted VRE (serve never
    reads the released pickles; `osdface weights convert` turns them into safetensors once)."""
    if not weights_dir.is_dir():
        return [
            f"weights folder {weights_dir} not found (run `osdface weights fetch`, "
            "or pass --weights / OSDFACE_WEIGHTS_DIR)"
        ]
    layout = WeightsLayout(weights_dir)
    if not layout.vre.is_file():
        return [
            f"{layout.vre} is missing: run `osdface weights convert --dir {weights_dir}` "
            "(serve never unpickles the released files)"
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
    logger.info("serving on http://%s:%d", settings.host, settings.port)
    server.run()
    return EXIT_MODEL_FAILED if failed else 0
