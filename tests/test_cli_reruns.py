"""What a GFPGAN or CodeFormer user meets in `osdface restore`: re-runs that know the settings
of what they would skip, their flags taken or answered in one line, `--compare`, and every run
with nothing to do (or a mistake) answered before torch is imported.

Real processes, tiny weights, the real mobile detector and real photos.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import run_osdface
from tests.video_helpers import photo_frame, write_clip

REPO = Path(__file__).resolve().parents[1]
MOBILE = ["--detector", "retinaface_mobile0.25", "--device", "cpu"]
LEDGER = ".osdface-run.jsonl"  # the output folder's record of what made each output
# Runs `osdface` in a fresh interpreter; prints its exit code and whether torch was imported.
PROBE = (
    "import sys; from osdface.cli import main; rc = main(sys.argv[1:]); "
    "print('PROBE', rc, 'torch' in sys.modules)"
)


def osdface(*argv: str, cwd: Path = REPO, stdin: bytes = b"") -> tuple[int, str]:
    code, _, err = run_osdface(*argv, cwd=cwd, stdin=stdin, timeout=300)
    return code, err


def probe(*argv: str, cwd: Path = REPO, stdin: int | None = subprocess.DEVNULL):
    """(exit code, torch imported, seconds, stderr) of `osdface ARGV` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        stdin=stdin,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    line = next((w for w in out.stdout.splitlines() if w.startswith("PROBE")), "PROBE -1 None")
    _, rc, torch_loaded = line.split()
    return int(rc), torch_loaded == "True", elapsed, out.stderr


def version_seconds() -> float:
    """The time of `osdface --version` (a fresh interpreter importing the command line): the
    yardstick for 'answered at once' on a machine of any speed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "osdface", "--version"], env=env, check=True)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture
def photo(tmp_path: Path, assets: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(assets / "images/gfpgan/cropped_faces/Adele_crop.png", folder / "adele.png")
    return folder / "adele.png"


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """2.0 s: 8 frames at 4 frames/s."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_clip(path, [photo_frame(assets)] * 8, fps=4)
    return path


# --- re-runs know their settings ------------------------------------------------------------------


def test_a_rerun_with_other_settings_is_refused_and_the_same_settings_skip_at_once(
    tmp_path: Path, photo: Path, tiny_weights_dir: Path
) -> None:
    out = tmp_path / "out"
    argv = ["restore", str(photo), "-o", str(out), "--weights", str(tiny_weights_dir), *MOBILE]
    code, err = osdface(*argv)
    assert code == 0, err
    first = (out / "adele.png").read_bytes()

    # Other settings: refused before any work, the difference named; the output untouched.
    code, _, seconds, err = probe(*argv, "--strength", "0.5")
    assert code == 2, err
    assert f"1 output in {out}/ was made with strength 1.0 (now 0.5); add --overwrite" in err
    assert (out / "adele.png").read_bytes() == first and (out / LEDGER).is_file()

    # The same settings: skipped, without importing torch, about as fast as `osdface --version`.
    yardstick = version_seconds()
    code, torch_loaded, seconds, err = probe(*argv)
    assert (code, torch_loaded) == (0, False), err
    assert "0 files restored, 0 faces, 1 skipped" in err
    assert seconds < max(1.0, 3 * yardstick), (seconds, yardstick)

    # --overwrite replaces it with the new settings (--compare: input | restored beside it).
    code, err = osdface(*argv, "--strength", "0.5", "--overwrite", "--compare")
    assert code == 0, err
    assert (out / "adele.png").read_bytes() != first
    with Image.open(photo) as src, Image.open(out / "compare/adele.png") as whole:
        assert whole.size == (2 * src.width, src.height)
        left = np.asarray(whole.convert("RGB"))[:, : src.width]
        assert np.array_equal(left, np.asarray(src.convert("RGB")))
    with Image.open(out / "compare/adele_face00.png") as face:
        assert face.size == (1024, 512)
    # The next run with those settings skips it (asking for no --compare images is the same);
    # asking for files it was made without is a difference.
    code, err = osdface(*argv, "--strength", "0.5")
    assert code == 0 and "1 skipped" in err, err
    code, err = osdface(*argv, "--strength", "0.5", "--save-faces")
    assert code == 2 and "made with save faces off (now on)" in err, err

    # An output with no record (an older osdface wrote it): skipped, with a note.
    (out / LEDGER).unlink()
    code, err = osdface(*argv, "--strength", "0.9")
    assert code == 0 and "1 skipped" in err, err
    assert "no record of the settings that made it" in err and "--overwrite" in err, err


# --- before torch: nothing to do, an empty stdin, a wrong flag ---------------------------------


def test_mistakes_and_empty_stdin_are_answered_before_torch(
    tmp_path: Path, short_clip: Path, tiny_weights_dir: Path
) -> None:
    yardstick = version_seconds()
    out = ["-o", str(tmp_path / "out"), "--weights", str(tiny_weights_dir), *MOBILE]
    clip = str(short_clip)
    cases = [
        (["restore", "-", "--weights", str(tiny_weights_dir), *MOBILE], "stdin is empty"),
        (["restore", clip, *out, "--crf", "99"], "--crf must be 0..63 (got 99)"),
        (["restore", clip, *out, "--start", "-1"], "--start must be at least 0 s (got -1)"),
        (["restore", clip, *out, "--start", "10"], "--start 10 s is past the clip's end (2.0 s)"),
        (["restore", clip, *out, "--window-frames", "0"], "--window-frames must be at least 1"),
        (["restore", clip, *out, "--upscale", "9"], "--upscale must be at most 4 (got '9')"),
    ]
    for argv, message in cases:
        code, torch_loaded, seconds, err = probe(*argv)
        assert (code, torch_loaded) == (2, False), (argv, err)
        assert message in err and "Traceback" not in err, err
        assert seconds < max(1.0, 3 * yardstick), (argv, seconds, yardstick)
    assert not (tmp_path / "out").exists()


# --- other tools' habits ----------------------------------------------------------------------


def test_gfpgan_spellings_are_taken_saying_ours(tmp_path: Path) -> None:
    from osdface.cli import parse

    argv = ["restore", "-i", str(tmp_path), "-s", "2", "--only_center_face"]
    _, args = parse([*argv, "--bg_upsampler", "realesrgan", "--save_faces", "--ext=png"])
    assert args.inputs == [str(tmp_path)]
    assert (args.upscale, args.only_center_face, args.background) == ("2", True, "realesrgan-x2")
    assert args.save_faces and args.output_format == "png"
    assert "-s is GFPGAN's and CodeFormer's spelling: using --upscale 2" in args.spelling_notes
    _, args = parse(["restore", "--input_path", str(tmp_path), "-s4", "--has_aligned"])
    assert (args.inputs, args.upscale, args.aligned) == ([str(tmp_path)], "4", True)


def test_a_foreign_knob_of_another_meaning_is_answered_in_one_line(tmp_path: Path) -> None:
    cases = [
        (["-w", "0.5"], "-w 0.5 is CodeFormer's fidelity weight"),
        (["--fidelity_weight", "0.7"], "--strength blends the restored face"),
        (["-v", "1.3"], "-v 1.3 picks GFPGAN's model version"),
        (["--bg_upsampler", "esrgan"], "the backgrounds here are realesrgan-x2"),
    ]
    for words, message in cases:
        code, err = osdface("restore", str(tmp_path), *words)
        assert code == 2, err
        assert message in err and "usage:" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    code, err = osdface("restore", str(tmp_path), "--strenght", "0.5")
    assert code == 2 and "did you mean --strength?" in err, err


# --- wording ------------------------------------------------------------------------------------


def test_restore_dot_in_a_photo_folder_writes_beside_it(photo: Path, tmp_path: Path) -> None:
    code, err = osdface("restore", ".", "--weights", str(tmp_path / "none"), cwd=photo.parent)
    assert code == 2, err  # the weights are missing: the output folder was chosen before that
    assert "results go to ../photos-restored/" in err, err
    assert "inside the input folder" not in err, err
    code, err = osdface("restore", ".", "-o", "sub", cwd=photo.parent)
    assert code == 2 and "e.g. -o ../photos-restored" in err, err


def test_library_messages_are_said_in_our_words(tmp_path: Path, assets: Path) -> None:
    from model.errors import ImageDecodeError, VideoDecodeError
    from model.media.codecs.decode import decode_image
    from model.media.codecs.formats import ImageLimits
    from model.media.video.io import VideoSource

    jpeg = (assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg").read_bytes()
    for data in (jpeg[:3000], b"\x89PNG\r\n\x1a\n" + bytes(100)):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, ImageLimits())
        assert "bytes not processed" not in str(info.value) and " at 0x" not in str(info.value)
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(1000))
    with pytest.raises(VideoDecodeError) as video:
        VideoSource(garbage)
    text = str(video.value)
    assert "[Errno" not in text and text.count(str(garbage)) == 1, text
    assert "Invalid data" in text


def test_settings_and_option_errors_use_the_shared_phrases(tmp_path: Path) -> None:
    env_error = run_osdface(
        "restore", str(tmp_path), cwd=tmp_path, env={"OSDFACE_DETECTOR": "yunet"}
    )[2]
    assert "--detector / OSDFACE_DETECTOR must be one of" in env_error, env_error
    assert "Input should be" not in env_error
    code, err = osdface("restore", str(tmp_path), "--faces", "a,b")
    assert code == 2 and "--faces must be face indices like 0,2" in err, err
    assert "Value error" not in err
    code, err = osdface("serve", "--port", "99999")
    assert code == 2 and "--port / OSDFACE_PORT: must be at most 65535 (got '99999')" in err, err


def test_the_ledger_names_each_difference(tmp_path: Path, photo: Path) -> None:
    """The ledger alone (no model): a differing record is refused with its words, a record
    cut short by a kill is passed over, and resuming (same settings) is not refused."""
    from osdface.cli import parse
    from osdface.common import UsageError
    from osdface.restore import command, ledger

    out = tmp_path / "out"
    out.mkdir()
    (out / "adele.png").write_bytes(photo.read_bytes())

    def config_and_plan(*flags: str):
        _, args = parse(["restore", str(photo), "-o", str(out), *flags])
        return command.read_flags(args)

    config, plan = config_and_plan()
    writer = ledger.start(config, plan.existing)
    assert writer is not None
    writer.written(plan.existing[0])
    writer.close()
    with (out / LEDGER).open("a") as f:
        f.write('{"output": "adele.png", "sett')  # a kill mid-line
    assert config_and_plan()[1].existing  # same settings: planned as skipped
    with pytest.raises(UsageError, match=r"made with faces all \(now 0\), upscale 1 \(now 2\)"):
        config_and_plan("--faces", "0", "--upscale", "2")
    lines = [json.loads(line) for line in (out / LEDGER).read_text().splitlines()[:-1]]
    assert lines[-1] == {"output": "adele.png", "settings": lines[0]["settings"]}
