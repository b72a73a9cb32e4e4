"""`osdface serve`: run the HTTP service under uvicorn (one process, one model worker).

Flags override the `OSDFACE_*` environment settings. On SIGTERM or Ctrl-C the server stops
accepting connections and reports not-ready at once, lets running requests finish for up to
`shutdown_grace_s`, lets the model worker drain, and exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from types import FrameType
from typing import get_args

import uvicorn
from pydantic import ValidationError

from model.config import DetectorName, Device, DType
from service.settings import Settings

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


def run(args: argparse.Namespace) -> int:
    from service.app import create_app  # imports torch; keep `osdface --help` fast

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        sys.stderr.write(f"osdface serve: invalid settings:\n{exc}\n")
        return 2
    if not settings.weights_dir.is_dir():
        sys.stderr.write(
            f"osdface serve: weights folder {settings.weights_dir} not found "
            "(run `osdface weights fetch`, or pass --weights / OSDFACE_WEIGHTS_DIR)\n"
        )
        return 2
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
    )
    server = _DrainingServer(config, on_exit=app.state.service.begin_drain)
    logger.info("serving on http://%s:%d", settings.host, settings.port)
    server.run()
    return 0
