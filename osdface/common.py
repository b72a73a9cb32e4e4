"""What the command groups share: the usage error (exit 2), counted nouns, the weights folder."""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(Exception):
    """The command line cannot be run as given (exit 2); the message says what to do."""


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def default_weights_dir() -> Path:
    """OSDFACE_WEIGHTS_DIR, else ./osdface-weights."""
    return Path(os.environ.get("OSDFACE_WEIGHTS_DIR", "./osdface-weights"))
