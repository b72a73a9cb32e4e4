"""Schemathesis, every check, against a real `osdface serve` through its own OpenAPI schema.

The examples of the schema, its coverage cases and bounded fuzzing (a fixed seed and a small
number of examples per operation, so the run is short and repeatable) must all pass: every
answer is one the schema declares, with the declared content type and headers, no 5xx, and
invalid input refused.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import REPO, e2e_server, skip

MAX_EXAMPLES = 15
SEED = 20250601


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, assets: Path, tmp_path_factory) -> Iterator[str]:
    if importlib.util.find_spec("schemathesis") is None:
        skip("schemathesis not installed (the dev extra)")
    with e2e_server(tiny_weights_dir, tmp_path_factory, "schemathesis-server") as base:
        yield base


def test_schemathesis_all_checks_pass(server: str, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(REPO / "schemathesis.toml"),
        "run",
        f"{server}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "120",
        "--generation-database",
        "none",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env()
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def _env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
