"""`osdface eval` end to end on real aligned crops: in-process with the tiny restorer and
through a real `osdface serve`; report, CSV, contact sheet, resume, compare, missing weights."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from osdface.cli import main
from osdface.eval.compare import compare_runs
from osdface.eval.paper import PAPER_TABLES
from tests.live_server import running_server

REPO = Path(__file__).resolve().parents[1]
# A light set: every metric network is checked in test_eval_metrics.py; this is the plumbing.
METRICS = "psnr,ssim,lpips,deg,niqe"


@pytest.fixture(scope="module")
def sets(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """HQ: three real aligned crops; LQ: their CelebA-Test-style degradations."""
    root = tmp_path_factory.mktemp("eval-sets")
    hq = root / "hq"
    hq.mkdir()
    for path in sorted((assets / "images/vqfr/cropped_faces").glob("*.png"))[:3]:
        shutil.copyfile(path, hq / path.name)
    assert main(["eval", "degrade", "--hq", str(hq), "-o", str(root / "lq"), "--seed", "1"]) == 0
    return root / "lq", hq


def _eval(lq: Path, hq: Path, out: Path, *extra: str) -> int:
    argv = ["eval", "--lq", str(lq), "--hq", str(hq), "-o", str(out), "--device", "cpu"]
    return main([*argv, "--dtype", "float32", "--batch-size", "2", *extra])


@pytest.fixture(scope="module")
def report(sets, eval_weights_dir: Path, tmp_path_factory) -> Path:
    lq, hq = sets
    out = tmp_path_factory.mktemp("eval-report") / "report"
    weights = ["--weights", str(eval_weights_dir)]
    assert _eval(lq, hq, out, *weights, "--metrics", METRICS, "--paper-table", "celeba-test") == 0
    return out


def test_report_files(report: Path, sets) -> None:
    lq, _ = sets
    names = sorted(p.stem for p in lq.glob("*.png"))
    metrics = json.loads((report / "metrics.json").read_text())
    for name in METRICS.split(","):
        assert set(metrics[name]) == {"mean", "count", "std"}
        assert metrics[name]["count"] == len(names)
    assert metrics["_run"]["restorer"]["kind"] == "in-process"
    with (report / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names
    mean_psnr = sum(float(r["psnr"]) for r in rows) / len(rows)
    assert metrics["psnr"]["mean"] == pytest.approx(mean_psnr)
    readme = (report / "README.md").read_text()
    assert "paper (celeba-test)" in readme
    assert f"{PAPER_TABLES['celeba-test']['lpips']:.4f}" in readme
    with Image.open(report / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * 256, 3 * (256 + 18))  # best, median, worst x LQ|restored|HQ
    assert sorted(p.stem for p in (report / "restored").glob("*.png")) == names


def test_rerun_resumes_and_compare_is_zero(report: Path, sets, eval_weights_dir: Path) -> None:
    lq, hq = sets
    restored = {p: p.stat().st_mtime_ns for p in (report / "restored").iterdir()}
    csv_before = (report / "per_image.csv").read_text()
    assert _eval(lq, hq, report, "--weights", str(eval_weights_dir), "--metrics", METRICS) == 0
    assert {p: p.stat().st_mtime_ns for p in (report / "restored").iterdir()} == restored
    assert (report / "per_image.csv").read_text() == csv_before
    for delta in compare_runs(report, report):
        assert delta.delta == 0.0, delta
        assert delta.low is None or (delta.low, delta.high) == (0.0, 0.0), delta


def test_psnr_ssim_need_no_metric_weights(sets, tiny_weights_dir: Path, tmp_path: Path) -> None:
    lq, hq = sets
    out = tmp_path / "r"
    assert _eval(lq, hq, out, "--weights", str(tiny_weights_dir), "--metrics", "psnr,ssim") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"psnr", "ssim", "_run"}
    # The fast path by default, as `osdface restore` runs; --no-fast is the plain path.
    assert metrics["_run"]["restorer"]["fast_path"]["enabled"] is True
    plain = tmp_path / "plain"
    argv = ["--weights", str(tiny_weights_dir), "--metrics", "psnr", "--no-fast"]
    assert _eval(lq, hq, plain, *argv) == 0
    described = json.loads((plain / "metrics.json").read_text())["_run"]["restorer"]
    assert described["fast_path"] == {"enabled": False}


def test_missing_metric_weights_named_before_restoring(
    sets, tiny_weights_dir: Path, tmp_path: Path
) -> None:
    lq, hq = sets
    command = [sys.executable, "-m", "osdface", "eval", "--lq", str(lq), "--hq", str(hq)]
    command += ["-o", str(tmp_path / "r"), "--weights", str(tiny_weights_dir)]
    command += ["--metrics", "psnr,lpips,fid_ffhq"]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=120, env=os.environ.copy()
    )
    assert result.returncode == 1
    for name in ("LPIPS_v0.1_alex-df73285e.pth", "ffhq_clean_trainval70k_512.npz", "--eval"):
        assert name in result.stderr
    assert not (tmp_path / "r").exists(), "nothing restored before the check"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metrics", "psnr,bogus"], "unknown metrics"),
        (["--metrics", "lpips", "--no-hq"], "lpips needs the HQ faces"),
    ],
)
def test_bad_arguments(sets, tmp_path: Path, caplog, argv: list[str], message: str) -> None:
    lq, hq = sets
    base = ["eval", "--lq", str(lq), "-o", str(tmp_path / "r")]
    if "--no-hq" in argv:
        argv = [a for a in argv if a != "--no-hq"]
    else:
        base += ["--hq", str(hq)]
    assert main([*base, *argv]) == 1
    assert message in caplog.text


@pytest.mark.parametrize(
    ("missing", "argv", "message"),
    [
        ("pyiqa", ["--metrics", "psnr,lpips"], "lpips needs pyiqa: install the eval extra"),
        ("httpx", ["--metrics", "psnr", "--url", "http://127.0.0.1:9"], "--url needs httpx"),
    ],
)
def test_a_missing_eval_package_is_named_with_its_install_command(
    sets, tmp_path: Path, caplog, monkeypatch, missing: str, argv: list[str], message: str
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name)
    )
    lq, hq = sets
    assert main(["eval", "--lq", str(lq), "--hq", str(hq), "-o", str(tmp_path / "r"), *argv]) == 1
    assert message in caplog.text and "`make dev`" in caplog.text
    assert not (tmp_path / "r").exists()


def test_fetch_eval_offline_lists_metric_files(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "osdface", "weights", "fetch", "--eval", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    for name in ("eval/pyiqa/musiq_koniq_ckpt-e95806b9.pth", "eval/clip/RN50.pt"):
        assert name in result.stderr


def test_through_a_running_service(
    sets, report: Path, eval_weights_dir: Path, tmp_path: Path, caplog
) -> None:
    """The same faces restored by `osdface serve` (POST /restore, aligned) score as in-process."""
    lq, hq = sets
    out = tmp_path / "http"
    with running_server(eval_weights_dir, tmp_path / "serve.log") as server:
        argv = ["--url", server.base, "--weights", str(eval_weights_dir)]
        with caplog.at_level(logging.INFO):
            assert _eval(lq, hq, out, *argv, "--metrics", "psnr,ssim,lpips") == 0
    assert "HTTP Request" not in caplog.text, "httpx's line per face shows only with -v"
    assert "restored" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["_run"]["restorer"]["kind"] == "http"
    local = {d.metric: d for d in compare_runs(report, out)}
    assert set(local) == {"psnr", "ssim", "lpips"}
    # Same weights, CPU fp32 on both sides: the PNGs agree to within rounding.
    assert abs(local["psnr"].delta) < 0.05 and abs(local["lpips"].delta) < 1e-3


def test_a_bad_lq_file_is_skipped_not_fatal(sets, tiny_weights_dir: Path, tmp_path: Path) -> None:
    lq, hq = sets
    bad_lq, bad_hq = tmp_path / "lq", tmp_path / "hq"
    shutil.copytree(lq, bad_lq)
    shutil.copytree(hq, bad_hq)
    Image.new("RGB", (256, 256)).save(bad_lq / "small.png")
    Image.new("RGB", (512, 512)).save(bad_hq / "small.png")
    out = tmp_path / "r"
    argv = ["--weights", str(tiny_weights_dir), "--metrics", "psnr,ssim"]
    assert _eval(bad_lq, bad_hq, out, *argv) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["psnr"]["count"] == len(list(lq.glob("*.png")))
    assert metrics["_run"]["skipped"] == ["small"]


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("degrade", "usage: osdface eval degrade [-h] --hq HQ -o OUTPUT [--seed SEED]"),
        ("compare", "usage: osdface eval compare [-h] [--resamples RESAMPLES] [--seed SEED]"),
    ],
)
def test_subcommand_help_has_its_own_usage_and_says_what_each_option_does(
    capsys, command: str, usage: str
) -> None:
    with pytest.raises(SystemExit):
        main(["eval", command, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(usage), out[:300]
    assert "--seed SEED           seed" in out


def test_progress_without_a_terminal_is_one_log_line_per_face(sets, tmp_path: Path) -> None:
    _, hq = sets
    run = subprocess.run(
        [sys.executable, "-m", "osdface", "eval", "degrade", "--hq", str(hq), "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "\r" not in run.stderr
    count = len(list(hq.glob("*.png")))
    for k in range(1, count + 1):
        assert f"[{k}/{count}] degraded" in run.stderr
