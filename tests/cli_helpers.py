"""`osdface` run as a user runs it: a fresh process, one thread, the repository on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_osdface(
    *argv: str,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    stdin: bytes = b"",
    timeout: float = 600,
) -> tuple[int, bytes, str]:
    """`python -m osdface ...`; (returncode, stdout bytes, stderr text)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "osdface", *argv],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )
    return result.returncode, result.stdout, result.stderr.decode()
