"""The README's try-out: `python -m tests.tiny_weights DIR` fails (exit 2) with what to do when
it found no face detector to copy, instead of a weights folder that cannot serve photos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_detector_to_copy_is_exit_2_with_the_remedy(tmp_path: Path) -> None:
    empty = tmp_path / "no-detectors"
    empty.mkdir()
    command = [sys.executable, "-m", "tests.tiny_weights", str(tmp_path / "w")]
    run = subprocess.run(
        [*command, "--released-only", "--detectors", str(empty)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "detection_mobilenet0.25_Final.pth" in run.stderr and str(empty) in run.stderr
    assert run.stdout == ""
