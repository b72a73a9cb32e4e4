"""The benchmark harnesses run end to end on tiny weights and report every configuration.

Timings are not checked (they belong to the benchmarks); what is checked is that each
harness measures what it says: the baseline and every configuration asked for, ratios against
the baseline, and parity against the fp32 reference.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
from pathlib import Path

import pytest

from bench import paired, speed
from bench.report import Results, Row


@pytest.fixture(scope="module")
def bench_weights(tmp_path_factory) -> Path:
    from bench.fullsize import ensure_weights

    return ensure_weights(tmp_path_factory.mktemp("bench") / "weights", tiny=True)


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| impl") and "---" not in line
    ]


def test_paired_rounds_report_each_config_against_the_baseline(bench_weights, tmp_path) -> None:
    results = tmp_path / "results.md"
    argv = ["--tiny", "--device", "cpu", "--weights-dir", str(bench_weights), "--rounds", "3",
            "--configs", "fast:float32,nosubpixel:float32,fast:bfloat16",
            "--results", str(results)]  # fmt: skip
    assert paired.main(argv) == 0
    rows = {r[0]: r for r in table_rows(results.read_text()) if r[0] != "configuration"}
    assert list(rows) == ["baseline fp32", "fast fp32", "nosubpixel fp32", "fast bf16"]
    for name in ("fast fp32", "nosubpixel fp32"):
        assert re.fullmatch(r"\*\*\d+\.\d\dx\*\*", rows[name][6])
        assert float(rows[name][8]) > 80  # same function as fp32, up to rounding
    assert 25 < float(rows["fast bf16"][8]) < 80
    assert "3 rounds after 1 warm-up" in results.read_text()


def test_model_harness_reports_baseline_configs_and_gmacs(bench_weights, tmp_path) -> None:
    results, raw = tmp_path / "results.md", tmp_path / "raw.json"
    argv = ["--tiny", "--device", "cpu", "--weights-dir", str(bench_weights), "--no-startup",
            "--configs", "plain:float32,fast:float32", "--repeats", "1", "--warmup", "1",
            "--results", str(results), "--json", str(raw)]  # fmt: skip
    sigterm = signal.getsignal(signal.SIGTERM)  # the harness turns SIGTERM into a report
    try:
        assert speed.main(argv) == 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    text = results.read_text()
    rows = table_rows(text)
    assert [r[0] for r in rows] == [
        "baseline", "ours (plain)", "ours/baseline", "ours (fast)", "ours/baseline"
    ]  # fmt: skip
    assert all(float(r[12]) > 80 for r in rows if r[0].startswith("ours ("))
    # the tiny decoder and UNet upsample too, so subpixel upsampling counts fewer products
    gmacs = json.loads(raw.read_text())["gmacs"]
    assert 0 < gmacs["total_subpixel"] < gmacs["total"]
    assert "subpixel upsampling does" in text


def test_failed_steps_are_reported_and_every_other_one_still_measured_and_written(
    bench_weights, tmp_path, monkeypatch, capsys
) -> None:
    """A failure injected into the baseline, one configuration and the start-up (as
    `BENCH_FAIL=... bash bench/gpu.sh --tiny` would): the other configuration is measured
    against the fp32 reference, and bench.json, the table and the summary all say what failed."""
    results, raw = tmp_path / "RESULTS.md", tmp_path / "bench.json"
    monkeypatch.setenv(speed.FAIL_ENV, "baseline,fast:bfloat16,startup:float32")
    argv = ["--tiny", "--device", "cpu", "--weights-dir", str(bench_weights),
            "--configs", "fast:bfloat16,startup:float32,nochannelslast:float32",
            "--batch-sizes", "1", "--repeats", "1", "--warmup", "1",
            "--results", str(results), "--json", str(raw)]  # fmt: skip
    sigterm = signal.getsignal(signal.SIGTERM)
    assert speed.main(argv) == 0
    assert signal.getsignal(signal.SIGTERM) == sigterm  # put back
    payload = json.loads(raw.read_text())
    rows = {(r["impl"], r["variant"], r["dtype"]): r for r in payload["rows"]}
    assert list(rows) == [
        ("baseline", "authors", "float32"), ("ours", "fast", "bfloat16"),
        ("ours", "nochannelslast", "float32"),
    ]  # fmt: skip
    for key in list(rows)[:2]:
        assert rows[key]["note"].startswith("failed: RuntimeError: injected failure")
    measured = rows["ours", "nochannelslast", "float32"]
    assert measured["total"] > 0 and measured["psnr_db"] > 80  # against the plain fp32 path
    assert "injected failure" in payload["startups"][0]["error"]
    table = table_rows(results.read_text())
    assert [r[0] for r in table] == [
        "baseline", "ours (fast)", "ours (nochannelslast)", "start-up", "fast"
    ]  # fmt: skip
    assert "injected failure of baseline" in table[0][-1]
    assert "injected failure of startup:float32" in table[4][2]
    capsys.readouterr()
    assert speed.main(["--summarize", str(raw)]) == 0
    summary = capsys.readouterr().out
    assert "ours nochannelslast fp32: batch 1" in summary
    assert "baseline authors fp32 batch 0: failed: RuntimeError: injected failure" in summary


def test_results_are_written_after_every_row(tmp_path: Path) -> None:
    raw = tmp_path / "bench.json"
    args = argparse.Namespace(json=raw, note="")
    results = Results(args, {"device": "cpu"})
    results.add(Row("ours", "fast", "float32", 1, total=0.5))
    assert [r["total"] for r in json.loads(raw.read_text())["rows"]] == [0.5]
    results.add_startup({"variant": "fast", "dtype": "float32", "error": "skipped"})
    assert json.loads(raw.read_text())["startups"][0]["error"] == "skipped"


def test_weights_killed_while_written_are_written_again(tmp_path: Path, monkeypatch) -> None:
    """The weights folder appears only once complete: a run killed while writing it leaves a
    temporary folder, which the next run replaces."""
    from bench import fullsize

    root = tmp_path / "weights"

    def killed(folder: Path, *, seed: int) -> Path:
        (folder / "osdface").mkdir(parents=True)
        raise KeyboardInterrupt  # as a kill would, half way

    monkeypatch.setattr(fullsize, "write_tiny", killed)
    with pytest.raises(KeyboardInterrupt):
        fullsize.ensure_weights(root, tiny=True)
    assert not root.exists()
    monkeypatch.undo()
    assert fullsize.ensure_weights(root, tiny=True) == root
    assert (root / fullsize.MARKER).is_file() and (root / "osdface/unet-merged").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]


def test_quality_bench_compares_each_configuration_with_the_first(
    tiny_weights_dir: Path, tmp_path: Path, assets: Path
) -> None:
    """Two runs of one configuration: equal means, and `eval compare` deltas of exactly 0."""
    from bench import quality

    results = tmp_path / "RESULTS.md"
    argv = ["--weights", str(tiny_weights_dir), "--copies", "1", "--configs", "float32,float32"]
    table = quality.main([*argv, "--results", str(results)])
    rows = table_rows(table)
    assert [r[0] for r in rows[1:]] == ["float32", "float32"]
    header = rows[0]
    reference, again = rows[1], rows[2]
    assert reference[1] == again[1] == str(len(quality.HQ_FACES))
    bounds = {"psnr": (5.0, 60.0), "ssim": (0.0, 1.0)}  # random weights: poor, not absurd
    for metric, (low, high) in bounds.items():
        k = header.index(metric)
        assert reference[k] == again[k] and low < float(reference[k]) < high
        assert reference[k + 1] == "A"
        assert again[k + 1] == "+0 (+0, +0)"
    assert results.read_text().strip().endswith(table.strip().splitlines()[-1])
