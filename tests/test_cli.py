"""The `osdface` command line as users run it: real processes, real photos, tiny weights."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osdface.cli import main
from tests.cli_helpers import run_osdface

REPO = Path(__file__).resolve().parents[1]
MOBILE = {"OSDFACE_DETECTOR": "retinaface_mobile0.25", "OSDFACE_DEVICE": "cpu"}
SUMMARY = re.compile(
    r"(\d+) files? restored, (\d+) faces?, (\d+) skipped \(output exists\), (\d+) failed, "
    r"(\d+) unsupported"
)


def osdface(*argv: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes = b""):
    """(returncode, stdout bytes, stderr) of `python -m osdface ...` in a fresh process."""
    return run_osdface(*argv, cwd=cwd, env=env, stdin=stdin)


def summary(stderr: str) -> tuple[int, ...]:
    found = SUMMARY.findall(stderr)
    assert found, stderr
    return tuple(int(v) for v in found[-1])


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def photos(tmp_path: Path, assets: Path) -> Path:
    """A folder as users have them: photos at two levels, a broken JPEG, a text file."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    crops = assets / "images/gfpgan/cropped_faces"
    shutil.copy(crops / "Adele_crop.png", folder / "adele.png")  # one face each
    shutil.copy(crops / "Justin_Timberlake_crop.png", folder / "justin.png")
    shutil.copy(assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg", folder / "trip/blake.jpg")
    jpeg = (assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(jpeg[:3000])  # truncated: undecodable
    (folder / "notes.txt").write_text("not a photo")
    return folder


# --- refused before anything loads -----------------------------------------------------------


def test_bad_arguments_answer_fast_without_traceback(
    tmp_path: Path, photos: Path, tiny_weights_dir: Path
) -> None:
    before = digests(photos)
    w = ["--weights", str(tiny_weights_dir)]
    cases = [
        (["restore", str(photos), "-o", str(photos), *w], "inside the input folder"),
        (["restore", str(photos / "adele.png"), "-o", str(photos), *w], "the input itself"),
        (["restore", str(photos), "--upscale", "9", *w], "--upscale"),
        (
            ["restore", str(photos), *w],
            "Resnet50_Final.pth is missing (retinaface_resnet50). `osdface weights fetch",
        ),
        (["restore", str(tmp_path / "nowhere"), *w], "no such file or folder"),
        (["restore", str(photos), "--weights", str(tmp_path)], "osdface weights fetch"),
    ]
    for argv, message in cases:
        start = time.perf_counter()
        code, _, err = osdface(*argv, cwd=tmp_path)
        elapsed = time.perf_counter() - start
        assert code == 2, (argv, err)
        assert message in err and "Traceback" not in err, err
        # The budget is 2 s on an idle machine; shared CI cores get a margin.
        assert elapsed < 6.0, (argv, elapsed)
    code, _, err = osdface(
        "restore", str(photos), *w, cwd=tmp_path, env={"OSDFACE_DETECTOR": "yunet"}
    )
    assert code == 2 and "--detector / OSDFACE_DETECTOR" in err and "Traceback" not in err
    assert digests(photos) == before  # not one byte of an input changed
    assert not (tmp_path / "results").exists()


def test_checks_run_before_torch_is_imported(photos: Path, tiny_weights_dir: Path) -> None:
    code = (
        "import sys, time; t = time.process_time(); from osdface.cli import main; "
        f"rc = main(['restore', {str(photos)!r}, '--upscale', '9']); "
        "print(rc, 'torch' in sys.modules, time.process_time() - t)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    rc, torch_loaded, cpu_s = out.stdout.split()
    assert (rc, torch_loaded) == ("2", "False")
    assert float(cpu_s) < 2.0  # CPU seconds: independent of how busy the machine is


def test_help_names_defaults_and_environment() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    text = subprocess.run(
        [sys.executable, "-m", "osdface", "restore", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    ).stdout
    for expected in ("OSDFACE_DETECTOR", "OSDFACE_DEVICE", "OSDFACE_MIN_FACE_SIZE", "examples:"):
        assert expected in text
    assert "(0..1; default: 0.97; env OSDFACE_DETECT_THRESHOLD)" in " ".join(text.split())
    weights_help = subprocess.run(
        [sys.executable, "-m", "osdface", "weights"], capture_output=True, text=True, env=env
    ).stdout
    assert "fetch" in weights_help and "merge" in weights_help


# --- a folder: interrupted, resumed, re-run ---------------------------------------------------


def test_folder_interrupted_resumed_and_rerun(
    tmp_path: Path, photos: Path, tiny_weights_dir: Path
) -> None:
    before = digests(photos)
    argv = ["restore", str(photos), "-r", "--weights", str(tiny_weights_dir)]
    out = tmp_path / "results"
    # 1. Killed as soon as the first result exists: mid-folder.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **MOBILE}
    first = subprocess.Popen(
        [sys.executable, "-m", "osdface", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not any(p.suffix for p in out.rglob("[!.]*")) and time.monotonic() < deadline:
        assert first.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = {p for p in out.rglob("[!.]*") if p.is_file()}
    assert 1 <= len(done_before) < 3
    # 2. The same command resumes: what exists is skipped, the rest restored, the broken named.
    report = tmp_path / "report.jsonl"
    code, _, err = osdface(*argv, "--report", str(report), cwd=tmp_path, env=MOBILE)
    assert code == 1, err
    assert re.search(r"FAILED .*broken\.jpg: ", err)
    restored, faces, skipped, failed, unsupported = summary(err)
    assert (restored + skipped, failed, unsupported) == (3, 1, 1)
    assert skipped == len(done_before)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    by_name = {Path(r["input"]).name: r for r in lines}
    assert sorted(by_name) == ["adele.png", "blake.jpg", "broken.jpg", "justin.png"]
    assert by_name["broken.jpg"]["status"] == "failed" and by_name["broken.jpg"]["error"]
    assert sum(len(r["faces"]) for r in lines) == faces
    for r in lines:
        if r["status"] == "restored":
            assert r["faces"] and all(len(f["box"]) == 4 and f["score"] > 0.9 for f in r["faces"])
            assert "restore" in r["timings"] and r["error"] is None
    # Same tree, every output whole and the size of its input; nothing else written but the
    # hidden record of the settings that made each (osdface/restore/ledger.py).
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == [".osdface-run.jsonl", "adele.png", "justin.png", "trip/blake.jpg"]
    for name in written[1:]:
        with Image.open(out / name) as result, Image.open(photos / name) as original:
            result.load()
            assert result.size == original.size
    # 3. Run again: every result is skipped and not touched; the report, named again, keeps
    # what the run that wrote each output found.
    kept = digests(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, _, err = osdface(*argv, "--report", str(report), cwd=tmp_path, env=MOBILE)
    assert code == 1 and summary(err)[:4] == (0, 0, 3, 1)
    again = {Path(r["input"]).name: r for r in map(json.loads, report.read_text().splitlines())}
    assert sorted(again) == sorted(by_name) and again["broken.jpg"]["status"] == "failed"
    for name, r in by_name.items():
        if r["status"] == "restored":
            assert again[name]["status"] == "skipped"
            assert (again[name]["faces"], again[name]["timings"]) == (r["faces"], r["timings"])
    assert digests(out) == kept
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert digests(photos) == before


# --- one image through stdin, aligned: the same options as whole photos -------------------------


def test_aligned_strength_zero_returns_the_input(assets: Path, tiny_weights_dir: Path) -> None:
    crop = assets / "images/gfpgan/cropped_faces/Adele_crop.png"
    argv = ["restore", "-", "--aligned", "--weights", str(tiny_weights_dir)]
    code, data, err = osdface(*argv, "--strength", "0", cwd=REPO, stdin=crop.read_bytes())
    assert code == 0, err
    out = tmp_image(data)
    with Image.open(crop) as original:
        assert np.array_equal(out, np.asarray(original.convert("RGB")))
    code, data, err = osdface(
        *argv, "--upscale", "2", "--format", "jpeg", cwd=REPO, stdin=crop.read_bytes()
    )
    assert code == 0, err
    assert data[:3] == b"\xff\xd8\xff" and tmp_image(data).shape == (1024, 1024, 3)


def test_save_faces_writes_the_crops_beside_the_result(
    tmp_path: Path, assets: Path, tiny_weights_dir: Path
) -> None:
    crop = assets / "images/gfpgan/cropped_faces/Adele_crop.png"
    out = tmp_path / "out"
    argv = [str(crop), "--aligned", "--save-faces", "-o", str(out), "-q"]
    assert main(["restore", *argv, "--weights", str(tiny_weights_dir), "--device", "cpu"]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == [
        ".osdface-run.jsonl",
        "Adele_crop.png",
        "faces/Adele_crop_00_aligned.png",
        "faces/Adele_crop_00_restored.png",
    ]
    with Image.open(out / "faces/Adele_crop_00_aligned.png") as aligned, Image.open(crop) as src:
        assert np.array_equal(np.asarray(aligned), np.asarray(src.convert("RGB")))


def tmp_image(data: bytes) -> np.ndarray:
    import io

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# --- weights ---------------------------------------------------------------------------------


def test_bad_arguments_exit_nonzero(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SystemExit) as err:
        main(["weights", "fetch", "--bogus"])
    assert err.value.code == 2
    for argv in (["restore"], ["restore", "--ray"], ["restore", "-o", "out", "--ray"]):
        assert main(argv) == 2
        assert "no inputs: name photo or video files" in caplog.text


@pytest.mark.parametrize(
    ("argv", "ray", "address", "inputs"),
    [
        (["--ray", "IN", "-o", "out"], True, None, ["IN"]),  # a plain flag: IN is an input
        (["--ray", "typo_photos", "IN"], True, None, ["typo_photos", "IN"]),
        (["--ray", "s3://bucket/scans", "-o", "s3://b/out"], True, None, ["s3://bucket/scans"]),
        (["IN", "--ray"], True, None, ["IN"]),
        (["IN", "--ray", "IN2"], True, None, ["IN", "IN2"]),  # inputs after the flag too
        (["--ray", "--ray-address", "ray://head:10001", "IN"], True, "ray://head:10001", ["IN"]),
        (["--ray-address=10.0.0.5:6379", "IN", "--ray"], True, "10.0.0.5:6379", ["IN"]),
        (["--ray", "--ray-address", "auto", "IN", "IN2"], True, "auto", ["IN", "IN2"]),
        (["IN"], False, None, ["IN"]),
    ],
)
def test_ray_is_a_flag_and_its_address_a_flag_of_its_own(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    ray: bool,
    address: str | None,
    inputs: list[str],
) -> None:
    from osdface.cli import parse
    from osdface.restore import command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").mkdir()
    _, args = parse(["restore", *argv])
    assert (args.ray, args.ray_address, command._inputs(args)) == (ray, address, inputs)


@pytest.mark.parametrize(
    ("argv", "address"),
    [
        (["--ray", "auto", "IN"], "auto"),
        (["--ray", "ray://head:10001", "IN"], "ray://head:10001"),
        (["--ray=ray://head:10001", "IN"], "ray://head:10001"),
        (["IN", "--ray", "10.0.0.5:6379"], "10.0.0.5:6379"),
        (["--ray", "[::1]:6379", "IN"], "[::1]:6379"),
    ],
)
def test_the_old_ray_address_form_is_refused_saying_what_to_write(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    argv: list[str],
    address: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").mkdir()
    try:
        code = main(["restore", *argv])
    except SystemExit as stop:  # argparse's own refusal of `--ray=VALUE`
        code = stop.code
    assert code == 2
    said = caplog.text + capsys.readouterr().err
    assert f"write --ray --ray-address {address}" in said, said
    assert main(["restore", "IN", "--ray-address", address]) == 2  # the address needs --ray
    assert "add --ray" in caplog.text


# Modules of the HTTP service: the command line and the Ray workers never load them.
SERVICE_MODULES = ("service", "fastapi", "prometheus_client", "uvicorn")
LOADED = f"sorted(m for m in sys.modules if m.split('.')[0] in {SERVICE_MODULES!r})"


def loaded_in_fresh_interpreter(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; the service's modules it loaded."""
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint({LOADED})"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of names


def test_restore_and_its_ray_stages_load_nothing_of_the_service(
    assets: Path, tiny_weights_dir: Path, tmp_path: Path
) -> None:
    """`osdface restore --help`, and the Ray stages built and run on one photo with
    --save-faces (each stage's own imports done), in fresh interpreters."""
    help_code = (
        "from osdface.cli import main\n"
        "try:\n    main(['restore', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert loaded_in_fresh_interpreter(help_code) == []
    photo = assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg"
    stages_code = f"""
import json, pickle
import numpy as np
from model.options import RestoreOptions
from model.runtime.settings import RuntimeSettings
from osdface.restore.config import RunConfig
from osdface.restore.plan import Job
from osdface.restore.ray_stages import Prepare, RestoreFaces, finish
settings = RuntimeSettings(
    weights_dir={str(tiny_weights_dir)!r}, detector="retinaface_mobile0.25", device="cpu"
)
config = RunConfig(settings, RestoreOptions().validated(), save_faces=True)
job = Job({str(photo)!r}, {str(tmp_path / "out.png")!r}, "png")
state = Prepare(config, num_cpus=1)({{"job": pickle.dumps(job)}})["state"]
batch = {{"state": np.array([state], dtype=object)}}
state = RestoreFaces(config, num_cpus=1)(batch)["state"][0]
assert json.loads(finish({{"state": state}}, config)["record"])["status"] == "restored"
"""
    assert loaded_in_fresh_interpreter(stages_code) == []
    assert (tmp_path / "out.png").is_file() and (tmp_path / "faces").is_dir()


def test_restore_loads_the_background_network_with_the_tile_settings(
    tmp_path: Path, tiny_weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OSDFACE_BACKGROUND_TILE* reach the network `osdface restore` loads (the runtime
    settings, read from the environment as the command reads them)."""
    from model.networks.background import TileSettings
    from model.options import RestoreOptions
    from model.runtime.settings import RuntimeSettings
    from osdface.restore.config import RunConfig
    from osdface.restore.reporting import Reporter
    from osdface.restore.runners import load_context
    from tests.tiny_realesrgan import write_tiny_realesrgan

    weights = tmp_path / "weights"
    weights.mkdir()
    for entry in tiny_weights_dir.iterdir():
        (weights / entry.name).symlink_to(entry)
    write_tiny_realesrgan(weights, "realesrgan-x2")
    monkeypatch.setenv("OSDFACE_BACKGROUND_TILE", "96")
    monkeypatch.setenv("OSDFACE_BACKGROUND_TILE_OVERLAP", "4")
    monkeypatch.setenv("OSDFACE_BACKGROUND_TILE_BATCH", "3")
    settings = RuntimeSettings(weights_dir=weights, device="cpu")
    options = RestoreOptions(aligned=True, background="realesrgan-x2").validated()
    context = load_context(
        RunConfig(settings, options), Reporter(1, quiet=True, tty=False, report=None)
    )
    assert context.backgrounds["realesrgan-x2"].tiles == TileSettings(96, 4, 3)


def test_docs_list_every_restore_option() -> None:
    from osdface.common import SETTING_FLAGS
    from osdface.restore.flags import FORM_FLAGS

    text = (REPO / "docs/cli.md").read_text()
    for flag, name, _ in SETTING_FLAGS:
        assert f"`{flag}" in text and f"`OSDFACE_{name.upper()}`" in text, flag
    for flag, *_ in FORM_FLAGS:
        assert f"`{flag}" in text, flag


def test_aligned_crops_share_model_calls_and_fail_alone(
    tmp_path: Path, assets: Path, tiny_weights_dir: Path
) -> None:
    """Crops restored 3 per call give the results of crops restored one by one; a broken one in
    the batch fails alone."""
    crops = tmp_path / "crops"
    crops.mkdir()
    for path in sorted((assets / "images/vqfr/cropped_faces").glob("*.png"))[:4]:
        shutil.copy(path, crops / path.name)
    (crops / "0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    common = ["restore", str(crops), "--aligned", "-q", "--weights", str(tiny_weights_dir)]
    assert main([*common, "-o", str(tmp_path / "one"), "--batch-size", "1"]) == 1
    assert main([*common, "-o", str(tmp_path / "three"), "--batch-size", "3"]) == 1
    one = sorted(p.name for p in (tmp_path / "one").glob("[!.]*"))
    assert one == sorted(p.name for p in (tmp_path / "three").glob("[!.]*"))
    assert len(one) == 4 and "0_broken.png" not in one
    for name in one:
        a, b = (tmp_image((tmp_path / d / name).read_bytes()) for d in ("one", "three"))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # batched = alone, to rounding


def test_plan_names_outputs_and_refuses_collisions(tmp_path: Path) -> None:
    from osdface.common import UsageError
    from osdface.restore.plan import make_plan

    (tmp_path / "a/sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for name in ("a/x.jpg", "a/sub/y.png", "a/.hidden.png", "a/readme.md", "b/x.jpg"):
        (tmp_path / name).write_bytes(b"")
    a, out = tmp_path / "a", tmp_path / "out"
    plan = make_plan([str(a), str(a / "x.jpg"), str(tmp_path / "a/*.jpg")], out, recursive=True)
    assert [j.target for j in plan.jobs] == [out / "sub/y.png", out / "x.jpg"]  # each once
    assert plan.unsupported == [a / "readme.md"] and plan.subfolders == []
    renamed = make_plan([str(a)], out, output_format="jpg", suffix="_r")
    assert [j.target for j in renamed.jobs] == [out / "x_r.jpg"]
    assert renamed.subfolders == [a / "sub"]  # not read without -r, and said so
    assert renamed.jobs[0].output_format == "jpeg"
    # In place with a suffix: earlier results are recognised, not restored again.
    (a / "x_r.jpg").write_bytes(b"")
    again = make_plan([str(a)], a, suffix="_r")
    assert [j.source for j in again.existing] == [(a / "x.jpg").resolve()] and not again.jobs
    redo = make_plan([str(a)], a, suffix="_r", overwrite=True)
    assert [j.target for j in redo.jobs] == [a / "x_r.jpg"] and not redo.existing
    for inputs, output in (
        ([str(a / "x.jpg"), str(tmp_path / "b/x.jpg")], out),  # two inputs, one output
        ([str(a)], a / "sub"),  # output inside an input folder
        ([str(tmp_path / "missing/*.png")], out),
        (["-", str(a)], out),
        ([str(a / "x.jpg")], tmp_path / "restored.jpg"),  # a file name where a folder goes
    ):
        with pytest.raises(UsageError):
            make_plan(inputs, output)


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    from model.atomic import write_atomic

    target = tmp_path / "out/a.png"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first" and os.listdir(target.parent) == ["a.png"]
    (target.parent / ".a.png.osdface-partial").mkdir()  # the temporary name cannot be opened
    with pytest.raises(OSError):
        write_atomic(target, b"second")
    assert target.read_bytes() == b"first"


def test_plan_keeps_phone_formats_it_can_write_and_video_containers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from osdface.restore.plan import make_plan

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("IMG_1.HEIC", "b.avif", "clip.MOV", "c.jpeg"):
        (folder / name).write_bytes(b"")
    out = tmp_path / "out"
    monkeypatch.setattr(
        "osdface.restore.plan.writable_formats", lambda: {"jpeg", "png", "webp", "heic"}
    )
    plan = make_plan([str(folder)], out)
    by_target = {j.target.name: (j.kind, j.output_format) for j in plan.jobs if j.target}
    assert by_target == {
        "IMG_1.heic": ("image", "heic"),
        "b.png": ("image", "png"),  # no AVIF encoder: lossless PNG, named as such
        "clip.MOV": ("video", None),
        "c.jpeg": ("image", "jpeg"),
    }
