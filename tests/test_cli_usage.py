"""What the command line says to a user who got something wrong: refused before anything loads
(exit 2, one line saying what to do), help texts in the command line's own words, and -q."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from tests.cli_helpers import run_osdface
from tests.live_server import free_port

REPO = Path(__file__).resolve().parents[1]
MOBILE = ["--detector", "retinaface_mobile0.25", "--device", "cpu"]


def osdface(*argv: str, cwd: Path = REPO, env: dict[str, str] | None = None, stdin: bytes = b""):
    """(returncode, stdout text, stderr) of `python -m osdface ...` in a fresh process."""
    code, out, err = run_osdface(*argv, cwd=cwd, env=env, stdin=stdin, timeout=300)
    return code, out.decode(), err


def _linked_without(tiny: Path, root: Path, left_out: str) -> Path:
    """A weights folder of links to `tiny`'s files, without those whose path starts so."""
    for path in tiny.rglob("*"):
        rel = path.relative_to(tiny).as_posix()
        if path.is_dir() or rel.startswith(left_out):
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(path.resolve())
    return root


# --- restore -----------------------------------------------------------------------------------


def test_a_missing_background_network_is_refused_before_loading(
    tmp_path: Path, assets: Path, tiny_weights_dir: Path
) -> None:
    photo = assets / "images/gfpgan/cropped_faces/Adele_crop.png"
    code, _, err = osdface(
        "restore", str(photo), "--weights", str(tiny_weights_dir), *MOBILE,
        "--background", "realesrgan-x2", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2, err
    assert "RealESRGAN_x2plus.safetensors" in err, err
    assert f"osdface weights fetch --background --dir {tiny_weights_dir}" in err, err
    assert "loading the restorer" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_stdin_with_an_output_folder_is_refused(tmp_path: Path, tiny_weights_dir: Path) -> None:
    code, out, err = osdface(
        "restore", "-", "-o", str(tmp_path / "foo"), "--weights", str(tiny_weights_dir),
        stdin=b"not read",
    )  # fmt: skip
    assert code == 2 and out == "", err
    assert "drop -o" in err and "Traceback" not in err, err
    assert not (tmp_path / "foo").exists()


def test_quiet_keeps_warnings_failures_and_the_summary_only(
    tmp_path: Path, assets: Path, tiny_weights_dir: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "adele.png").write_bytes(
        (assets / "images/gfpgan/cropped_faces/Adele_crop.png").read_bytes()
    )
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    argv = ["restore", str(photos), "--weights", str(tiny_weights_dir), *MOBILE]
    code, _, err = osdface(*argv, "-o", str(tmp_path / "loud"))
    assert "loading the restorer" in err, err  # what -q is to drop is there without it
    code, _, err = osdface(*argv, "-o", str(tmp_path / "quiet"), "-q")
    assert code == 1, err  # broken.jpg failed
    lines = err.strip().splitlines()
    assert [line for line in lines if " INFO " in line] == [lines[-1]], err
    assert re.search(r"1 files? restored", lines[-1]), err
    assert any("FAILED" in line and "broken.jpg" in line for line in lines), err


def test_restore_help_speaks_of_the_command_line() -> None:
    code, text, _ = osdface("restore", "--help")
    text = " ".join(text.split())
    assert code == 0
    for http_words in ("X-Output-Format", "the server", "the JSON lists", "this field"):
        assert http_words not in text, http_words
    assert "-v, --verbose debug logging, tracebacks" in text
    assert "(default: one per core; env OSDFACE_TORCH_THREADS)" in text
    assert "default: None" not in text
    assert "(0..1; default: 1.0)" in text  # --strength
    assert "when written as JPEG, else 95 (1..100)" in text  # --quality


def test_unknown_flag_gets_the_usage_of_its_command(tmp_path: Path) -> None:
    code, _, err = osdface("restore", str(tmp_path), "--bogus")
    assert code == 2
    assert err.startswith("usage: osdface restore"), err
    assert "osdface restore: error: unrecognized arguments: --bogus" in err


def test_command_groups_without_a_command_print_their_own_help() -> None:
    for group, word in (("weights", "fetch"), ("train", "stage1")):
        code, out, _ = osdface(group)
        assert code == 2
        assert out.startswith(f"usage: osdface {group}"), out
        assert word in out


def test_weights_and_eval_and_serve_help() -> None:
    _, text, _ = osdface("weights", "--help")
    assert "fetch, convert, merge and verify model weights" in text
    _, text, _ = osdface("eval", "--help")
    usage = text.split("\n\n")[0]
    assert "osdface eval --lq DIR -o REPORT" in usage, usage
    assert not usage.rstrip().endswith("{degrade,compare} ..."), usage
    assert "--device {auto,cpu,cuda}" in text
    code, _, err = osdface("eval", "--device", "gpu0", "--lq", ".", "-o", "r")
    assert code == 2 and "invalid choice: 'gpu0'" in err
    _, text, _ = osdface("serve", "--help")
    assert "OSDFACE_SHUTDOWN_GRACE_S" in text and "shutdown_grace_s" not in text


# --- serve -------------------------------------------------------------------------------------


def test_serve_names_the_flag_of_a_bad_value(tiny_weights_dir: Path) -> None:
    code, _, err = osdface("serve", "--weights", str(tiny_weights_dir), "--port", "99999")
    assert code == 2
    assert "--port / OSDFACE_PORT: must be at most 65535" in err, err


def test_serve_checks_the_detector_and_backgrounds_as_restore_does(
    tmp_path: Path, tiny_weights_dir: Path
) -> None:
    weights = _linked_without(tiny_weights_dir, tmp_path / "w", "facexlib/")
    code, _, err = osdface("serve", "--weights", str(weights), "--device", "cpu")
    assert code == 2, err
    assert "detection_Resnet50_Final.pth is missing" in err, err
    assert "--detector retinaface_mobile0.25" in err and f"--dir {weights}" in err, err
    assert "--aligned" not in err and "Traceback" not in err, err
    env = {"OSDFACE_BACKGROUND_MODELS": '["realesrgan-x4"]'}
    code, _, err = osdface("serve", "--weights", str(tiny_weights_dir), *MOBILE, env=env)
    assert code == 2, err
    assert f"osdface weights fetch --background --dir {tiny_weights_dir}" in err, err


def test_serve_refuses_a_port_in_use_before_loading(assets: Path, tiny_weights_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, out, err = osdface(
            "serve", "--weights", str(tiny_weights_dir), *MOBILE, "--port", port
        )
    assert code == 2, err
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port / OSDFACE_PORT" in err, err
    assert "serving on" not in err + out and "loading the restorer" not in err, err
    assert "Traceback" not in err


def test_background_paths_agree_with_the_loader(tmp_path: Path) -> None:
    """The command line checks with weights.layout (no torch); weights.background loads."""
    from model.config import BACKGROUND_SCALES
    from weights import background
    from weights.layout import background_file

    for name, scale in BACKGROUND_SCALES.items():
        assert background_file(tmp_path, scale, ".pth") == background.released_path(tmp_path, name)
        assert background_file(tmp_path, scale) == background._converted(tmp_path, name)
