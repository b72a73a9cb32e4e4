"""Defaults the command groups share."""

from __future__ import annotations

import os
from pathlib import Path


def default_weights_dir() -> Path:
    """OSDFACE_WEIGHTS_DIR, else ./osdface-weights."""
    return Path(os.environ.get("OSDFACE_WEIGHTS_DIR", "./osdface-weights"))
