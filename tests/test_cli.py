"""The `osdface` command line, end to end on tiny weights in the released layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from osdface.cli import main
from tests.tiny_weights import write_tiny_weights

REPO = Path(__file__).resolve().parents[1]


def test_restore_aligned_writes_one_png_per_crop(tmp_path: Path, assets: Path) -> None:
    weights = write_tiny_weights(tmp_path / "w", prepare=False)  # released files only
    assert main(["weights", "convert", "--dir", str(weights)]) == 0
    crops = assets / "images/gfpgan/cropped_faces"
    out = tmp_path / "out"
    code = main(
        [
            "restore",
            "--aligned",
            "--weights",
            str(weights),
            str(crops),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "3",
        ]
    )
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(p.stem + ".png" for p in crops.iterdir())
    for path in out.iterdir():
        with Image.open(path) as im:
            assert im.size == (512, 512) and im.mode == "RGB"


def test_weights_convert_and_merge_commands(tmp_path: Path) -> None:
    weights = write_tiny_weights(tmp_path / "w", prepare=False)
    assert main(["weights", "convert", "--dir", str(weights)]) == 0
    assert main(["weights", "merge", "--dir", str(weights)]) == 0
    assert (weights / "osdface/unet-merged/diffusion_pytorch_model.safetensors").is_file()


def test_fetch_offline_fails_fast_naming_files(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "osdface", "weights", "fetch", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    for name in (
        "sd21-base/unet/diffusion_pytorch_model.safetensors",
        "osdface/associate_2.ckpt",
        "facexlib/detection_Resnet50_Final.pth",
    ):
        assert name in result.stderr


@pytest.mark.parametrize("argv", [["restore"], ["weights", "fetch", "--bogus"]])
def test_bad_arguments_exit_nonzero(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2


def test_restore_whole_photos_keeps_each_size(
    tmp_path: Path, tiny_weights_dir: Path, assets
) -> None:
    photos = assets / "images/gfpgan/whole_imgs"
    out = tmp_path / "out"
    code = main(
        [
            "restore",
            "--weights",
            str(tiny_weights_dir),
            str(photos),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--detector",
            "retinaface_mobile0.25",
            "--save-faces",
        ]
    )
    assert code == 0
    for photo in photos.iterdir():
        with Image.open(photo) as original, Image.open(out / photo.name) as restored:
            assert restored.size == original.size and restored.format == original.format
            assert restored.tobytes() != original.convert(restored.mode).tobytes()
    # the assets README counts 2 + 3 + 2 faces; each face gives an aligned and a restored crop
    assert len(list((out / "faces").glob("*_aligned.png"))) == 7
    assert len(list((out / "faces").glob("*_restored.png"))) == 7
