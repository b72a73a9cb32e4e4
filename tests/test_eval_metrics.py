"""The metrics of `osdface eval`, one by one: PSNR/SSIM against scikit-image, the pyiqa
networks, ArcFace angle and landmark distance built from random weights in their real files,
FID, the offline guard, the bootstrap and the CelebA-Test degradation."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from model.errors import InvalidInputError, WeightsNotFoundError
from osdface.eval import fidelity
from osdface.eval.compare import paired_bootstrap
from osdface.eval.degrade import RECORD, degrade_folder
from osdface.eval.files import METRIC_FILES, offline_pyiqa, require_files
from osdface.eval.landmarks import heatmap_points
from osdface.eval.run import read_face
from osdface.eval.scorers import Scorers

FULL_REFERENCE = ["psnr", "ssim", "lpips", "dists", "deg", "lmd"]
NO_REFERENCE = ["musiq", "niqe", "clipiqa"]
LOWER_BETTER = {"lpips", "dists", "deg", "lmd"}


def blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), sigma)


@pytest.fixture(scope="module")
def faces(assets: Path) -> list[np.ndarray]:
    # One face: each full set of metric networks takes about a minute per face on 2 busy cores.
    return [read_face(assets / "images/gfpgan/cropped_faces/Adele_crop.png")]


@pytest.fixture(scope="module")
def scorers(eval_weights_dir: Path) -> Scorers:
    return Scorers.build(FULL_REFERENCE + NO_REFERENCE, eval_weights_dir, torch.device("cpu"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a host name or open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[-1] if args else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- PSNR and SSIM against scikit-image ------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.8, 3.0])
def test_psnr_ssim_match_scikit_image(faces: list[np.ndarray], sigma: float) -> None:
    a, b = faces[0], blur(faces[0], sigma)
    expected_ssim = structural_similarity(
        a,
        b,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert fidelity.ssim(a, b) == pytest.approx(expected_ssim, abs=1e-9)
    assert fidelity.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255))


def test_identical_images_cap_psnr(faces: list[np.ndarray]) -> None:
    assert fidelity.psnr(faces[0], faces[0].copy()) == fidelity.PSNR_CAP_DB
    assert fidelity.ssim(faces[0], faces[0].copy()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one size"):
        fidelity.psnr(faces[0], faces[0][:256])


# --- the metric networks, random weights in their real files ----------------------------------


def test_identical_faces_score_perfect(scorers: Scorers, faces: list[np.ndarray]) -> None:
    same = scorers.score(faces, [f.copy() for f in faces])
    assert same["psnr"] == [fidelity.PSNR_CAP_DB]
    assert same["ssim"] == pytest.approx([1.0])
    assert same["lpips"] == pytest.approx([0.0], abs=1e-6)
    assert same["dists"] == pytest.approx([0.0], abs=1e-5)
    assert same["deg"] == pytest.approx([0.0], abs=0.1)  # arccos near 1 is steep
    assert same["lmd"] == [0.0]
    for name in NO_REFERENCE:
        assert len(same[name]) == 1 and math.isfinite(same[name][0]), name


def test_blurred_scores_worse_on_every_full_reference_metric(
    scorers: Scorers, faces: list[np.ndarray]
) -> None:
    full_reference = Scorers(FULL_REFERENCE, scorers.device, scorers._networks)
    light = full_reference.score([blur(f, 1.0) for f in faces], faces)
    heavy = full_reference.score([blur(f, 6.0) for f in faces], faces)
    for name in ("psnr", "ssim", "lpips", "dists", "deg"):
        for lo, hi in zip(light[name], heavy[name], strict=True):
            worse = hi > lo if name in LOWER_BETTER else hi < lo
            assert worse, f"{name}: heavy blur {hi} not worse than light blur {lo}"
    # Random landmark heatmaps only move when the peak moves: never better than identical.
    assert all(v >= 0.0 for v in heavy["lmd"])


def test_missing_file_named_before_loading(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        require_files(tmp_path, ["psnr", "lpips", "deg"])
    message = str(err.value)
    for path in (*METRIC_FILES["lpips"], *METRIC_FILES["deg"]):
        assert path in message
    assert "osdface weights fetch --eval" in message


def test_guard_refuses_downloads_without_touching_the_network(
    tmp_path: Path, no_network: None
) -> None:
    from torchvision import models

    with offline_pyiqa(tmp_path), pytest.raises(WeightsNotFoundError, match="never downloads"):
        models.alexnet(weights="IMAGENET1K_V1")  # what pyiqa's LPIPS asks torchvision for
    import pyiqa

    with offline_pyiqa(tmp_path), pytest.raises(WeightsNotFoundError, match="fetch --eval"):
        pyiqa.create_metric("niqe", device="cpu")


def test_metrics_build_offline(eval_weights_dir: Path, no_network: None) -> None:
    Scorers.build(["niqe", "clipiqa", "deg"], eval_weights_dir, torch.device("cpu"))


def test_fid_zero_for_the_same_folder_and_against_ffhq(
    eval_weights_dir: Path, assets: Path, tmp_path: Path
):
    from osdface.eval.fid import FID

    crops = sorted((assets / "images/vqfr/cropped_faces").glob("*.png"))[:4]
    sharp, blurred = tmp_path / "sharp", tmp_path / "blurred"
    for folder, sigma in ((sharp, 0.0), (blurred, 4.0)):
        folder.mkdir()
        for path in crops:
            rgb = read_face(path)
            cv2.imwrite(
                str(folder / path.name),
                cv2.cvtColor(blur(rgb, sigma) if sigma else rgb, cv2.COLOR_RGB2BGR),
            )
    # Two FIDs only: each is a 2048x2048 matrix square root, a minute on a busy 2-core machine.
    fid = FID(eval_weights_dir, torch.device("cpu"))
    assert fid.against_folder(sharp, sharp) == pytest.approx(0.0, abs=1e-3)
    assert fid.against_ffhq(blurred) > 0.0


# --- landmarks decoding, bootstrap, degradation ----------------------------------------------


def test_heatmap_points_quarter_pixel_towards_larger_neighbour() -> None:
    heat = torch.zeros(1, 2, 64, 64)
    heat[0, 0, 10, 20] = 1.0
    heat[0, 0, 10, 21] = 0.5  # right neighbour larger: x + 0.25
    heat[0, 0, 9, 20] = 0.5  # upper neighbour larger: y - 0.25
    heat[0, 1, 63, 0] = 1.0  # a corner: no neighbour on either axis, no shift
    points = heatmap_points(heat)
    assert points[0, 0].tolist() == [20.75, 10.25]
    assert points[0, 1].tolist() == [0.5, 63.5]


def test_bootstrap_interval() -> None:
    a = np.linspace(0.0, 1.0, 50)
    assert paired_bootstrap(a, a) == (0.0, 0.0)
    assert paired_bootstrap(a, a + 0.25) == pytest.approx((0.25, 0.25))
    rng = np.random.default_rng(1)
    b = a + rng.normal(0.1, 0.05, a.size)
    low, high = paired_bootstrap(a, b)
    assert low < (b - a).mean() < high and high - low < 0.05


def test_degrade_is_seeded_recorded_and_resumable(assets: Path, tmp_path: Path) -> None:
    hq = assets / "images/gfpgan/cropped_faces"
    first = degrade_folder(hq, tmp_path / "a", seed=3)
    second = degrade_folder(hq, tmp_path / "b", seed=3)
    assert [p.name for p in first] == [p.name for p in second] and first
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(read_face(a), read_face(b))
        assert not np.array_equal(read_face(a), read_face(hq / f"{a.stem}.png"))
    record = json.loads((tmp_path / "a" / RECORD).read_text())
    assert record["seed"] == 3 and set(record["faces"]) == {p.stem for p in first}
    assert record["config"]["first"]["jpeg_quality"] == [60, 100]
    assert degrade_folder(hq, tmp_path / "a", seed=3) == []  # resumed: nothing left
    with pytest.raises(InvalidInputError, match="seed"):
        degrade_folder(hq, tmp_path / "a", seed=4)
    with pytest.raises(InvalidInputError, match="differ"):
        degrade_folder(hq, hq)


def test_partial_checkpoint_keys_are_checked(scorers: Scorers, tmp_path: Path) -> None:
    """pyiqa loads LPIPS's file with strict=False; a file whose keys do not match is refused."""
    from model.errors import StateDictMismatchError
    from osdface.eval.iqa import check_partial_checkpoint

    network = scorers._networks["lpips"].network.net
    good = {k: v for k, v in network.state_dict().items() if k.startswith("lin")}
    torch.save(good, tmp_path / "good.pth")
    check_partial_checkpoint("lpips", network, tmp_path / "good.pth")
    renamed = {k.replace("lin", "lins.", 1): v for k, v in good.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(StateDictMismatchError, match=r"missing .*lin0\.model\.1\.weight"):
        check_partial_checkpoint("lpips", network, tmp_path / "renamed.pth")


@pytest.mark.slow  # MANIQA is a ViT-B/8 on 20 crops: its random 540 MB file and one face
def test_maniqa_builds_offline_and_scores(
    tmp_path: Path, faces: list[np.ndarray], no_network: None
) -> None:
    from tests.eval_weights import write_maniqa

    write_maniqa(tmp_path)
    scorers = Scorers.build(["maniqa"], tmp_path, torch.device("cpu"))
    scores = scorers.score(faces, None)["maniqa"]
    assert len(scores) == 1 and math.isfinite(scores[0])
