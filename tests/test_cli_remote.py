"""`osdface restore --url` against a real `osdface serve` (tiny weights, CPU, loopback): the local
command's outputs, names and report through the service, resume, a server killed and started
again mid-run, a queue of one under `--concurrency 8`, a video job, and the refusals that end a
run before anything is sent.

One server (API key, jobs folder) for most tests; the queue-of-one and the kill tests start
their own, as their settings and fate differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osdface.cli import main
from tests.cli_helpers import REPO, run_osdface
from tests.live_server import LiveServer, running_server, skip, wait_until
from tests.service_helpers import metric

KEY = "remote-cli-key-2718"
LOCAL = ["--detector", "retinaface_mobile0.25", "--device", "cpu", "--dtype", "float32"]
SERVE_ENV = {
    "OSDFACE_CPU_WORKERS": "1",
    "OSDFACE_SHUTDOWN_GRACE_S": "2",
    "OSDFACE_JOB_WINDOW_FRAMES": "2",
    "OMP_NUM_THREADS": "1",
}


def _needs_detector(weights: Path) -> None:
    if not (weights / "facexlib" / "detection_mobilenet0.25_Final.pth").exists():
        skip("the RetinaFace MobileNet detector is not in the shared assets")


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, assets: Path, tmp_path_factory) -> LiveServer:
    _needs_detector(tiny_weights_dir)
    root = tmp_path_factory.mktemp("remote-server")
    env = {**SERVE_ENV, "OSDFACE_API_KEY": KEY, "OSDFACE_JOBS_DIR": str(root / "jobs")}
    with running_server(tiny_weights_dir, root / "serve.log", env) as live:
        yield live


def photo_folder(folder: Path, assets: Path, copies: int = 1) -> Path:
    """Real photos: two aligned-size crops (one face each) and a whole photo (two faces)."""
    folder.mkdir(parents=True)
    crops, whole = assets / "images/gfpgan/cropped_faces", assets / "images/gfpgan/whole_imgs"
    sources = {
        "adele.png": crops / "Adele_crop.png",
        "justin.png": crops / "Justin_Timberlake_crop.png",
        "blake.jpg": whole / "Blake_Lively.jpg",
    }
    for k in range(copies):
        for name, source in sources.items():
            stem, suffix = name.split(".")
            shutil.copy(source, folder / (f"{stem}{k}.{suffix}" if copies > 1 else name))
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def report(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {Path(r["input"]).name: r for r in lines}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith("osdface-partial")]


def remote(*argv: str, url: str, key: str | None = KEY, **kw):
    env = {"OSDFACE_API_KEY": key} if key is not None else {}
    return run_osdface("restore", *argv, "--url", url, env=env, **kw)


# --- the local command, through the service ----------------------------------------------------


def test_outputs_names_and_report_equal_the_local_commands(
    server: LiveServer, tiny_weights_dir: Path, assets: Path, tmp_path: Path
) -> None:
    photos = photo_folder(tmp_path / "photos", assets)
    originals = digests(photos)
    there, here = tmp_path / "remote", tmp_path / "local"
    code, _, err = remote(
        str(photos), "-o", str(there), "--report", str(tmp_path / "remote.jsonl"), url=server.base
    )
    assert code == 0, err
    assert "3 files restored, 4 faces, 0 skipped (output exists), 0 failed" in err
    code, _, err = run_osdface(
        "restore", str(photos), "-o", str(here), "--weights", str(tiny_weights_dir), *LOCAL,
        "--report", str(tmp_path / "local.jsonl"),
    )  # fmt: skip
    assert code == 0, err
    assert sorted(os.listdir(there)) == sorted(os.listdir(here))  # names, and the ledger
    for name in originals:
        difference = np.abs(pixels(there / name) - pixels(here / name)).max()
        assert difference <= 1, (name, difference)
    far, near = report(tmp_path / "remote.jsonl"), report(tmp_path / "local.jsonl")
    assert far.keys() == near.keys() == originals.keys()
    for name, record in far.items():
        assert record.keys() == near[name].keys()
        assert record["timings"].keys() == near[name]["timings"].keys()
        assert record["status"] == "restored" and record["output"] == str(there / name)
        assert record["faces"] == near[name]["faces"]
        assert record["face_count"] == near[name]["face_count"]
    # A re-run skips everything, through the ledger's record of the service's settings.
    code, _, err = remote(str(photos), "-o", str(there), url=server.base)
    assert code == 0 and "0 files restored, 0 faces, 3 skipped" in err, err
    # ... and other settings are refused, not skipped, as locally.
    code, _, err = remote(str(photos), "-o", str(there), "--strength", "0.5", url=server.base)
    assert code == 2 and "strength 1.0 (now 0.5)" in err, err
    assert digests(photos) == originals and no_partial_files(there)


def test_stdin_to_stdout_and_the_key_from_a_file(
    server: LiveServer, assets: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    photo = (assets / "images/gfpgan/cropped_faces/Adele_crop.png").read_bytes()
    code, out, err = remote(
        "-", "--api-key-file", str(key_file), "--format", "png", url=server.base, key=None,
        stdin=photo,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith(b"\x89PNG") and "1 file restored, 1 face" in err


def test_a_file_the_service_refuses_fails_alone(
    server: LiveServer, assets: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(assets / "images/gfpgan/cropped_faces/Adele_crop.png", photos / "adele.png")
    jpeg = (assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg").read_bytes()
    (photos / "broken.jpg").write_bytes(jpeg[:3000])  # truncated: undecodable
    out, log = tmp_path / "out", tmp_path / "r.jsonl"
    code, _, err = remote(str(photos), "-o", str(out), "--report", str(log), url=server.base)
    assert code == 1, err
    assert "1 file restored, 1 face, 0 skipped (output exists), 1 failed" in err
    records = report(log)
    assert records["adele.png"]["status"] == "restored" and (out / "adele.png").is_file()
    broken = records["broken.jpg"]
    assert broken["status"] == "failed" and "request id" in broken["error"], broken
    assert f"FAILED {photos / 'broken.jpg'}: {broken['error']}" in err
    assert not (out / "broken.jpg").exists() and no_partial_files(out)


def test_a_video_comes_back_with_the_local_frames_and_audio(
    server: LiveServer, tiny_weights_dir: Path, assets: Path, tmp_path: Path
) -> None:
    from tests.video_helpers import clip_facts, photo_frame, write_clip

    (tmp_path / "clips").mkdir()
    clip = tmp_path / "clips/clip.mp4"
    write_clip(clip, [photo_frame(assets)] * 4, fps=10)
    code, _, err = remote(
        str(clip), "-o", str(tmp_path / "remote"), "--report", str(tmp_path / "r.jsonl"),
        url=server.base,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_osdface(
        "restore", str(clip), "-o", str(tmp_path / "local"), "--weights", str(tiny_weights_dir),
        *LOCAL, "--window-frames", "2",
    )  # fmt: skip
    assert code == 0, err
    far, near = clip_facts(tmp_path / "remote/clip.mp4"), clip_facts(tmp_path / "local/clip.mp4")
    assert far.frames == near.frames == 4
    assert far.audio_packets and far.audio_packets == near.audio_packets
    (record,) = report(tmp_path / "r.jsonl").values()
    assert record["frames"] == 4 and record["face_count"] == 8 and record["status"] == "restored"
    assert no_partial_files(tmp_path / "remote")
    refused = ["-o", str(tmp_path / "remote"), "--codec", "libx264"]
    code, _, err = remote(str(clip), *refused, url="http://127.0.0.1:9")
    assert code == 2 and "--codec is not available for videos with --url" in err


# --- stopped before anything is sent -----------------------------------------------------------


def test_a_wrong_key_stops_at_once_with_the_services_words(
    server: LiveServer, assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photos = photo_folder(tmp_path / "photos", assets)
    argv = ["restore", str(photos), "-o", str(tmp_path / "out"), "--url", server.base]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        code = main([*argv, "--api-key", "not-the-key"])
    assert code == 2 and time.monotonic() - started < 2.0
    assert "refused the API key (401 unauthorized: a valid 'Authorization: Bearer" in caplog.text
    assert not (tmp_path / "out").exists()
    unreachable = "http://127.0.0.1:9"  # the discard port: nothing listens
    code, _, err = run_osdface(*argv[:-1], unreachable, timeout=30)
    assert code == 2 and f"cannot reach the service at {unreachable}" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--device", "cpu"], "--device is a setting of the machine that runs the model"),
        (["--weights", "w"], "--weights is a setting of the machine that runs the model"),
        (["--ray"], "--ray is not available with --url"),
        (["--compare"], "--compare is not available with --url"),
        (["--concurrency", "0"], "--concurrency must be at least 1"),
    ],
)
def test_local_only_flags_are_refused_in_one_line(
    flags: list[str], said: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8")
    url = "http://127.0.0.1:9"  # never asked: the flags are refused first
    with caplog.at_level(logging.ERROR):
        code = main(
            ["restore", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "o"), "--url", url, *flags]
        )
    assert code == 2 and said in caplog.text


def test_what_the_service_does_not_do_is_refused_from_its_info(
    server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8")
    base = ["restore", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "o"), "--url", server.base]
    cases = [
        (["--detector", "retinaface_resnet50"], "is not what"),
        (["--background", "realesrgan-x2"], "--background realesrgan-x2 is not loaded on"),
        (["--max-faces", "99"], "--max-faces 99 is over"),
    ]
    for flags, said in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main([*base, "--api-key", KEY, *flags]) == 2, flags
        assert said in caplog.text, (flags, caplog.text)
    assert not (tmp_path / "o").exists()


def test_the_remote_run_imports_no_torch(server: LiveServer, assets: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(assets / "images/gfpgan/cropped_faces/Adele_crop.png", photos / "a.png")
    code = (
        "import sys\nfrom osdface.cli import main\n"
        f"rc = main(['restore', {str(photos)!r}, '-o', {str(tmp_path / 'o')!r}, "
        f"'--url', {server.base!r}, '--api-key', {KEY!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'cv2', 'diffusers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.stdout.strip() == "0 []", done.stderr
    assert (tmp_path / "o/a.png").is_file()


def test_the_photo_stages_named_apart_from_the_models_are_the_restorers() -> None:
    from model.networks.restorer import STAGES
    from osdface.restore.remote_runner import MODEL_STAGES

    assert MODEL_STAGES == STAGES


# --- a service under pressure ------------------------------------------------------------------


def test_a_queue_of_one_and_concurrency_8_retries_every_429(
    tiny_weights_dir: Path, assets: Path, tmp_path: Path
) -> None:
    _needs_detector(tiny_weights_dir)
    env = {**SERVE_ENV, "OSDFACE_MAX_QUEUE_FACES": "1", "OSDFACE_MAX_BATCH_FACES": "1"}
    photos = photo_folder(tmp_path / "photos", assets, copies=2)
    with running_server(tiny_weights_dir, tmp_path / "serve.log", env) as live:
        code, _, err = remote(
            str(photos), "-o", str(tmp_path / "out"), "--concurrency", "8",
            "--report", str(tmp_path / "r.jsonl"), url=live.base, key=None,
        )  # fmt: skip
        refused = live.metrics()
    assert code == 0, err
    records = report(tmp_path / "r.jsonl")
    assert len(records) == 6 and {r["status"] for r in records.values()} == {"restored"}
    retried = sum(r["retried"] for r in records.values())
    assert retried > 0, "a queue of one under 8 at once answers 429s"
    assert "6 files restored, 8 faces, 0 skipped (output exists), 0 failed" in err
    assert f"{retried} request{'s' if retried > 1 else ''} retried" in err
    assert metric(refused, "osdface_rejected_total") >= retried > 0


def test_a_server_killed_and_started_again_mid_run(
    tiny_weights_dir: Path, assets: Path, tmp_path: Path
) -> None:
    _needs_detector(tiny_weights_dir)
    photos = photo_folder(tmp_path / "photos", assets, copies=2)
    out = tmp_path / "out"
    with running_server(tiny_weights_dir, tmp_path / "first.log", SERVE_ENV) as first:
        argv = [sys.executable, "-m", "osdface", "restore", str(photos), "-o", str(out)]
        argv += ["--url", first.base, "--concurrency", "2", "--report", str(tmp_path / "r.jsonl")]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        run = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        try:

            def some_written() -> bool:
                return out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())

            wait_until(some_written, 120, "the first output")
            first.process.kill()  # SIGKILL: requests in flight lose their connection
            first.process.wait(timeout=10)
            with running_server(
                tiny_weights_dir, tmp_path / "second.log", SERVE_ENV, port=first.port
            ):
                _, err = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 0, err
    records = report(tmp_path / "r.jsonl")
    assert len(records) == 6 and {r["status"] for r in records.values()} == {"restored"}, err
    assert sum(r["retried"] for r in records.values()) > 0
    assert "6 files restored, 8 faces, 0 skipped (output exists), 0 failed" in err
    for path in out.iterdir():
        if not path.name.startswith("."):
            with Image.open(path) as im:
                im.load()  # whole files only
    assert no_partial_files(out)
