"""`osdface restore --ray` on a local Ray cluster (2 CPUs), tiny weights, the real photos.

The end-to-end test copies real photos into RAY_TEST_INPUTS inputs, kills a first run
part-way, runs again, and checks every output byte for byte against the local CLI's result for
the same photo, the report, the summary and the exit code. 200 inputs by default, as a
user's archive (2 min 50 s on this project's 2-core machine: two Ray start-ups, model loading
in each worker, tiny-weights model calls); OSDFACE_RAY_TEST_INPUTS=16 for a quick run.
Same settings on both sides: `--batch-size 1` and one thread per model process, because a
model call's numbers depend in the last bits on its batch size and thread count (tests below
check the batching separately).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray", reason="ray[data] is not installed (pip install -e .[ray])")

from model.runtime.settings import RuntimeSettings
from osdface.common import UsageError
from osdface.restore import uris
from osdface.restore.config import RunConfig
from osdface.restore.ledger import LEDGER
from osdface.restore.plan import Job, make_plan, plan_uris
from osdface.restore.ray_stages import PhotoState, RestoreFaces, _pack, _unpack


def plan_jobs(inputs: list[str], output: str, **flags: object):
    """The plan of a --ray run."""
    return make_plan(inputs, output, ray=True, **flags)


REPO = Path(__file__).resolve().parents[1]
RAY_TEST_INPUTS = int(os.environ.get("OSDFACE_RAY_TEST_INPUTS", "200"))
# Originals and their face counts (the assets README; RetinaFace finds exactly these).
ORIGINALS = {
    "gfpgan/cropped_faces/Adele_crop.png": 1,
    "gfpgan/cropped_faces/Justin_Timberlake_crop.png": 1,
    "vqfr/cropped_faces/Eliane_Karp_0001_00_lq.png": 1,
    "gfpgan/whole_imgs/Blake_Lively.jpg": 2,
}
COMMON = ["--device", "cpu", "--detector", "retinaface_mobile0.25", "--batch-size", "1"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "osdface", "restore", *argv]


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group, then wait for the Ray workers of that session to go."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 90
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in session_pids(proc.pid):  # workers Ray left behind: ours, by id
        os.kill(pid, signal.SIGKILL)


def visible(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
    )


@pytest.fixture(scope="module")
def photos(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder of the distinct originals, folder of RAY_TEST_INPUTS copies + one broken file)."""
    root = tmp_path_factory.mktemp("ray")
    originals, inputs = root / "originals", root / "inputs"
    originals.mkdir()
    inputs.mkdir()
    for rel in ORIGINALS:
        shutil.copyfile(assets / "images" / rel, originals / Path(rel).name)
    names = sorted(p.name for p in originals.iterdir())
    for k in range(RAY_TEST_INPUTS):
        name = names[k % len(names)]
        shutil.copyfile(originals / name, inputs / f"{k:03d}_{name}")
    data = (originals / "Blake_Lively.jpg").read_bytes()
    (inputs / "broken.jpg").write_bytes(data[: len(data) // 3])  # a truncated JPEG
    return originals, inputs


@pytest.fixture(scope="module")
def reference(photos, tiny_weights_dir: Path, tmp_path_factory) -> Path:
    """The local CLI's results for the distinct originals, with the same settings."""
    originals, _ = photos
    out = tmp_path_factory.mktemp("reference")
    argv = cli(str(originals), "-o", str(out), "--weights", str(tiny_weights_dir), *COMMON)
    subprocess.run(argv, check=True, cwd=REPO, env=one_thread_env(), timeout=600)
    written = sorted(p.name for p in out.iterdir() if p.name != LEDGER)
    assert written == sorted(p.name for p in originals.iterdir())
    return out


def original_of(name: str) -> str:
    return name.split("_", 1)[1]


def test_ray_run_killed_then_resumed_equals_the_local_cli(
    photos, reference: Path, tiny_weights_dir: Path, tmp_path: Path
) -> None:
    _, inputs = photos
    before = {p.name: sha256(p) for p in inputs.iterdir()}
    out = tmp_path / "out"
    argv = [str(inputs), "-o", str(out), "--weights", str(tiny_weights_dir), *COMMON]
    ray = ["--ray-cpus", "2", "--ray"]

    # 1. a run killed (SIGKILL, driver and cluster) after a few outputs
    first = subprocess.Popen(
        cli(*argv, "--report", str(tmp_path / "r1.jsonl"), *ray),
        cwd=REPO,
        env=one_thread_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while len(visible(out)) < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        kill_session(first)
    assert first.returncode == -signal.SIGKILL, "the first run ended before it was killed"
    done_before = visible(out)
    assert 3 <= len(done_before) < RAY_TEST_INPUTS
    for path in done_before:  # what a killed run leaves is whole, never half a file
        assert path.read_bytes() == (reference / original_of(path.name)).read_bytes(), path

    # 2. the same command again, inputs named by a file:// URI this time: it resumes
    argv[0] = f"file://{inputs}"
    second = subprocess.run(
        cli(*argv, "--report", str(tmp_path / "r2.jsonl"), *ray),
        cwd=REPO,
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 1, second.stderr[-3000:]  # one broken input: exit 1
    restored = RAY_TEST_INPUTS - len(done_before)
    summary = f"{restored} files restored"
    assert f"{summary}, " in second.stderr and f"{len(done_before)} skipped" in second.stderr
    assert "1 failed" in second.stderr and "FAILED" in second.stderr
    assert "broken.jpg" in [
        line.split("FAILED ")[1].split(":")[0].rsplit("/", 1)[-1]
        for line in second.stderr.splitlines()
        if "FAILED " in line
    ]

    # every output equals the local CLI's for the same photo; no partial file is left
    outputs = {p.name for p in out.iterdir()} - {LEDGER}  # the settings that made each
    assert outputs == {n for n in before if n != "broken.jpg"}
    for name in outputs:
        assert (out / name).read_bytes() == (reference / original_of(name)).read_bytes(), name
    assert {p.name: sha256(p) for p in inputs.iterdir()} == before, "inputs untouched"

    # the report: one line per input, statuses, faces, the failure named
    records = [json.loads(line) for line in (tmp_path / "r2.jsonl").read_text().splitlines()]
    assert len(records) == RAY_TEST_INPUTS + 1
    by_name = {Path(r["input"]).name: r for r in records}
    assert set(by_name) == set(before)
    assert by_name["broken.jpg"]["status"] == "failed"
    assert "broken.jpg" in by_name["broken.jpg"]["input"] and by_name["broken.jpg"]["error"]
    skipped = {n for n, r in by_name.items() if r["status"] == "skipped"}
    assert skipped == {p.name for p in done_before}
    for name, record in by_name.items():
        if record["status"] == "restored":
            assert record["output"] == str(out / name)
            faces = ORIGINALS[next(k for k in ORIGINALS if k.endswith(original_of(name)))]
            assert len(record["faces"]) == faces, name
            assert {"decode", "detect", "restore", "paste", "encode"} <= set(record["timings"])


# --- the parts, without a cluster ----------------------------------------------------------


def test_uri_plan_names_outputs_skips_existing_and_refuses_clashes(tmp_path: Path) -> None:
    """The planner for filesystem URIs (run here on local paths through pyarrow's local
    filesystem): the local CLI's names, resume, and every clash refused."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.jpg", "b.png", "c.jpeg", "notes.txt", ".hidden.png"):
        (inputs / name).write_bytes(b"x")
    out = tmp_path / "out"
    found = plan_uris([str(inputs)], str(out), None)
    assert [Path(j.target).name for j in found.jobs] == ["a.jpg", "b.png", "c.jpeg"]
    assert found.existing == [] and [Path(p).name for p in found.unsupported] == ["notes.txt"]
    out.mkdir()
    (out / "b.png").write_bytes(b"done")
    found = plan_uris([str(inputs)], str(out), "webp")
    assert [Path(j.target).name for j in found.jobs] == ["a.webp", "b.webp", "c.webp"]
    found = plan_uris([str(inputs)], str(out), None)
    assert [Path(j.source).name for j in found.existing] == ["b.png"]
    assert len(plan_uris([str(inputs)], str(out), None, overwrite=True).jobs) == 3
    with pytest.raises(UsageError, match="inside the input folder"):
        plan_uris([str(inputs)], str(inputs / "restored"), None)
    with pytest.raises(UsageError, match="is an input"):
        plan_uris([str(inputs / "a.jpg")], str(inputs), None)
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(UsageError, match="both be written"):
        plan_uris([str(inputs / "a.jpg"), str(tmp_path / "a.png")], str(out), "png")
    with pytest.raises(UsageError, match="no such file"):
        plan_uris([str(tmp_path / "missing")], str(out), None)
    assert uris.normalize(f"file://{inputs}") == str(inputs)


def test_local_paths_get_the_local_cli_plan(tmp_path: Path) -> None:
    """--ray on local folders plans as the local CLI does: recursion, suffix, the same targets."""
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png", "clip.mp4"):
        (inputs / name).write_bytes(b"x")
    (inputs / "clip.mp4").unlink()
    out = tmp_path / "out"
    found = plan_jobs([str(inputs)], str(out), recursive=True, suffix="_r")
    local = make_plan([str(inputs)], out, recursive=True, suffix="_r")
    assert [(j.source, j.target) for j in found.jobs] == [
        (str(j.source), str(j.target)) for j in local.jobs
    ]
    assert sorted(Path(j.target).relative_to(out).as_posix() for j in found.jobs) == [
        "a_r.jpg",
        "sub/b_r.png",
    ]
    with pytest.raises(UsageError, match="inside the input folder"):
        plan_jobs([str(inputs)], str(inputs / "restored"))
    (inputs / "clip.mp4").write_bytes(b"x")
    with pytest.raises(UsageError, match="restores photos"):
        plan_jobs([str(inputs)], str(out))


def test_help_does_not_import_ray_or_torch() -> None:
    code = "import sys; from osdface.cli import build_parser; build_parser(); "
    code += "print(sorted(m for m in ('ray', 'torch', 'pyarrow') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_restore_stage_batches_faces_across_photos_and_returns_each_its_own(
    tiny_weights_dir: Path,
) -> None:
    from model.options import RestoreOptions

    settings = RuntimeSettings(weights_dir=tiny_weights_dir, max_batch_faces=2, device="cpu")
    config = RunConfig(settings, RestoreOptions().validated())
    stage = RestoreFaces(config, num_cpus=2)
    g = torch.Generator().manual_seed(0)

    def photo(name: str, faces: int, size: int = 512) -> PhotoState:
        crops = torch.randint(0, 256, (faces, size, size, 3), generator=g, dtype=torch.uint8)
        return PhotoState(Job(name, name + ".out", "png"), prepared=None, crops=crops.numpy())

    def run(*states: PhotoState) -> list[PhotoState]:
        batch = {"state": np.array([_packed(s) for s in states], dtype=object)}
        return [_unpacked(b) for b in stage(batch)["state"]]

    # faces a0 c0 | c1: model calls of 2 faces, across photos
    result = run(photo("a", 1), photo("b", 0), photo("c", 2))
    assert [s.job.source for s in result] == ["a", "b", "c"]
    for state in (result[0], result[2]):
        assert state.error is None
        crops = torch.from_numpy(state.crops).permute(0, 3, 1, 2).float() / 255
        alone = stage.restorer(crops).images.numpy()  # this photo's faces in one call
        assert state.restored.shape == alone.shape
        # Other batch sizes than the reference: equal up to float rounding, never mixed up.
        assert np.abs(state.restored - alone).max() < 1e-3, state.job.source
    assert result[1].restored is None and result[1].error is None
    # a photo the restorer refuses fails alone; the others of its batch are restored
    bad, good = run(photo("bad", 1, size=64), photo("e", 1))
    assert bad.error and "expected (B, 3, 512, 512)" in bad.error and bad.restored is None
    assert good.error is None and good.restored.shape == (1, 3, 512, 512)


def _packed(state: PhotoState) -> bytes:
    return _pack(state)["state"]


def _unpacked(data: bytes) -> PhotoState:
    return _unpack({"state": data})


def test_stage_resources_one_restorer_per_gpu_and_cpu_shares_that_fit() -> None:
    from osdface.restore.ray_stages import stage_resources

    gpu = stage_resources({"CPU": 32.0, "GPU": 4.0})
    assert gpu.restore == {"num_gpus": 1} and gpu.restore_actors == 4
    assert gpu.prepare_actors == (1, 28)
    cpu = stage_resources({"CPU": 2.0})
    assert cpu.restore_actors == 1 and "num_gpus" not in cpu.restore
    # every stage can hold a worker at once on 2 CPUs: 1 restorer + a preparer + a writer
    assert cpu.restore["num_cpus"] + cpu.prepare_cpus + cpu.finish_cpus <= 2.0


def test_ray_refuses_stdin_before_loading_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        cli("-", "-o", str(tmp_path / "out"), "--ray"), cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "- (stdin) is not available with --ray" in result.stderr
    assert not (tmp_path / "out").exists()


def test_stages_write_what_the_local_cli_writes_with_background_and_faces(
    assets: Path, tiny_weights_dir: Path, tmp_path: Path
) -> None:
    """--background and --save-faces on Ray: the stages run in this process on one photo of
    two faces, against the local CLI's result and faces/ for it (same settings, batch 1, one
    thread)."""
    from model.options import RestoreOptions
    from osdface.restore.ray_stages import Prepare, finish
    from tests.tiny_realesrgan import write_tiny_realesrgan

    weights = tmp_path / "weights"
    weights.mkdir()
    for entry in tiny_weights_dir.iterdir():
        (weights / entry.name).symlink_to(entry)
    write_tiny_realesrgan(weights, "realesrgan-x2")
    photo = assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg"
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    argv = cli(str(photo), "-o", str(local), "--weights", str(weights), *COMMON, "--save-faces")
    argv += ["--background", "realesrgan-x2"]
    subprocess.run(argv, check=True, env=one_thread_env(), timeout=300)

    settings = RuntimeSettings(
        weights_dir=weights, detector="retinaface_mobile0.25", max_batch_faces=1, device="cpu"
    )
    options = RestoreOptions(background="realesrgan-x2").validated()
    config = RunConfig(settings, options, save_faces=True)
    job = Job(str(photo), str(ray_out / photo.name), "jpeg")
    threads = torch.get_num_threads()
    try:
        prepared = Prepare(config, num_cpus=1)({"job": pickle.dumps(job)})
        batch = {"state": np.array([prepared["state"]], dtype=object)}
        restored = RestoreFaces(config, num_cpus=1)(batch)["state"][0]
        record = json.loads(finish({"state": restored}, config)["record"])
    finally:
        torch.set_num_threads(threads)
    assert record["status"] == "restored" and len(record["faces"]) == 2
    assert record["timings"]["background"] > 0

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    with Image.open(photo) as im:
        width, height = im.size
    ours, theirs = pixels(ray_out / photo.name), pixels(local / photo.name)
    assert ours.shape == theirs.shape == (2 * height, 2 * width, 3)  # the network's scale
    assert np.abs(ours - theirs).max() <= 1
    names = sorted(p.name for p in (local / "faces").iterdir())
    assert names == sorted(p.name for p in (ray_out / "faces").iterdir())
    kinds = ("aligned", "restored")
    assert names == [f"Blake_Lively_{k:02d}_{kind}.png" for k in (0, 1) for kind in kinds]
    for name in names:
        a, b = pixels(ray_out / "faces" / name), pixels(local / "faces" / name)
        assert a.shape == b.shape == (512, 512, 3)
        # aligned crops are the same pixels; restored ones at most one level apart
        assert np.abs(a - b).max() <= (0 if "aligned" in name else 1), name


def test_ray_without_weights_answers_before_starting_a_cluster(
    tmp_path: Path, tiny_weights_dir: Path
) -> None:
    (tmp_path / "in").mkdir()
    shutil.copyfile(REPO / "service/static/style.css", tmp_path / "in" / "x.png")
    argv = [str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    argv += ["--weights", str(tmp_path / "none"), "--ray"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(cli(*argv), cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "osdface weights fetch" in result.stderr and "Traceback" not in result.stderr
    # the model's files there, the detector's not
    shutil.copytree(tiny_weights_dir, tmp_path / "none", ignore=shutil.ignore_patterns("*.pth"))
    result = subprocess.run(cli(*argv), cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "detector file" in result.stderr and "retinaface_resnet50" in result.stderr
    assert not (tmp_path / "out").exists()


def test_engine_errors_are_reported_by_their_root_cause() -> None:
    from osdface.restore.ray_driver import root_cause

    text = "The actor died \x1b[36mray::MapWorker\x1b[39m\n  File x\nWeightsNotFoundError: gone"
    assert root_cause(RuntimeError(text)) == "WeightsNotFoundError: gone"
