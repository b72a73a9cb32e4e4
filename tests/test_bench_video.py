"""bench/video.py end to end on tiny weights: both modes run the whole path and are reported.

Timings are not checked (they belong to the benchmark); the call counts say that one mode
makes one restorer call per frame and the other batches the faces of several frames.
"""

from __future__ import annotations

from pathlib import Path

from bench import video as bench_video


def test_video_bench_reports_per_frame_and_batched_calls(tmp_path: Path, assets: Path) -> None:
    results = tmp_path / "results.md"
    argv = ["--tiny", "--device", "cpu", "--frames", "3", "--size", "256", "--rounds", "1"]
    argv += ["--batch-faces", "4", "--assets", str(assets), "--results", str(results)]
    table = bench_video.main(argv)
    assert results.read_text().strip() == table.strip()
    rows = {
        cells[0]: cells
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line and not line.startswith("| mode")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    per_frame, batched = rows["one frame per call"], rows["batched (4 faces/call)"]
    assert per_frame[1:4] == ["3", "6", "3"], "3 frames, 6 faces, one call per frame"
    assert batched[1:4] == ["3", "6", "2"], "6 faces in calls of 4: 2 calls"
    assert "Batched across frames / one frame per call" in table
