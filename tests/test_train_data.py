"""Training data: degradation kernels and ranges, seeded determinism, sampler, configs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.train_helpers import (
    one_thread,  # noqa: F401 - autouse fixture
    write_faces,
)
from train.config import (
    DegradationConfig,
    DegradationStage,
    Stage1Config,
    Stage2Config,
    load_config,
)
from train.data import (
    FaceDataset,
    TrainBatches,
    degrade,
    gaussian_kernel,
    sample_rng,
    sample_stage,
)


@pytest.mark.parametrize(
    ("size", "sx", "sy", "theta"),
    [(21, 0.1, 0.1, 0.0), (21, 3.0, 3.0, 0.0), (41, 10.0, 2.0, 0.7), (41, 0.5, 9.0, 2.9)],
)
def test_kernels_sum_to_one_and_are_point_symmetric(size, sx, sy, theta):
    k = gaussian_kernel(size, sx, sy, theta)
    assert k.shape == (size, size) and k.dtype == np.float32
    assert k.sum() == pytest.approx(1.0, abs=1e-5)
    assert (k >= 0).all()
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # Gaussian: k(x) = k(-x)


def test_isotropic_kernel_matches_opencv_separable_gaussian():
    ref1d = cv2.getGaussianKernel(21, 2.5, cv2.CV_64F)[:, 0]
    np.testing.assert_allclose(
        gaussian_kernel(21, 2.5, 2.5, 0.0), np.outer(ref1d, ref1d), atol=1e-6
    )


def test_anisotropic_kernel_rotates_its_long_axis():
    k = gaussian_kernel(41, 8.0, 1.0, 0.0)  # long along x
    assert k[20, 30] > 100 * k[30, 20]
    k90 = gaussian_kernel(41, 8.0, 1.0, math.pi / 2)  # long along y
    np.testing.assert_allclose(k90, k.T, atol=1e-6)


def test_sampled_parameters_stay_in_their_ranges():
    stage = DegradationStage(
        blur_sigma=(0.5, 4.0),
        downsample=(1.5, 6.0),
        noise_sigma=(2.0, 15.0),
        jpeg_quality=(40, 70),
        isotropic_prob=0.3,
    )
    modes = ("area", "bicubic")
    seen = {"blur": 0, "aniso": 0}
    for i in range(400):
        p = sample_stage(np.random.default_rng(i), stage, modes)
        assert p is not None
        sx, sy, theta = p.blur
        assert 0.5 <= sx <= 4.0 and 0.5 <= sy <= 4.0 and 0.0 <= theta <= math.pi
        seen["aniso"] += sx != sy
        assert 1.5 <= p.downsample <= 6.0 and p.resize_mode in modes
        assert 2.0 <= p.noise_sigma <= 15.0
        assert 40 <= p.jpeg_quality <= 70 and isinstance(p.jpeg_quality, int)
    assert 0.55 * 400 < seen["aniso"] < 0.85 * 400  # isotropic_prob 0.3


def test_stage_probabilities_are_obeyed():
    never = DegradationStage(prob=0.0)
    assert all(sample_stage(np.random.default_rng(i), never, ("area",)) is None for i in range(50))
    none_inside = DegradationStage(blur_prob=0, downsample_prob=0, noise_prob=0, jpeg_prob=0)
    p = sample_stage(np.random.default_rng(0), none_inside, ("area",))
    assert p.blur is None and p.downsample is None and p.noise_sigma is None
    assert p.jpeg_quality is None


def test_degradation_is_seeded_and_keeps_shape_and_range():
    hq = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    config = DegradationConfig()
    a, drawn_a = degrade(hq, config, sample_rng(7, 0, 3))
    b, drawn_b = degrade(hq, config, sample_rng(7, 0, 3))
    c, _ = degrade(hq, config, sample_rng(7, 1, 3))
    assert a.shape == hq.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert drawn_a == drawn_b
    assert not np.array_equal(a, c)
    assert np.abs(a - hq).mean() > 0.01  # something happened


def test_identity_degradation_returns_the_image():
    hq = np.random.default_rng(1).random((32, 32, 3), dtype=np.float32)
    off = DegradationStage(blur_prob=0, downsample_prob=0, noise_prob=0, jpeg_prob=0)
    lq, _ = degrade(hq, DegradationConfig(first=off, second=off), np.random.default_rng(0))
    np.testing.assert_array_equal(lq, hq)


def test_dataset_items_do_not_depend_on_workers(tmp_path: Path):
    files = sorted(write_faces(tmp_path / "faces", 6).iterdir())
    ds = FaceDataset(files, 32, DegradationConfig(), seed=3, hflip=True)
    again = FaceDataset(files, 32, DegradationConfig(), seed=3, hflip=True)
    item = ds[(2, 4)]
    assert item["gt"].shape == (3, 32, 32) and item["lq"].dtype == torch.float32
    assert torch.equal(item["lq"], again[(2, 4)]["lq"])
    assert not torch.equal(item["lq"], ds[(3, 4)]["lq"])  # a new epoch, a new degradation
    sampler = TrainBatches(len(ds), 2, seed=0)
    serial = DataLoader(ds, batch_sampler=sampler, num_workers=0)
    parallel = DataLoader(ds, batch_sampler=sampler, num_workers=2)
    for (x, y), _ in zip(zip(serial, parallel, strict=False), range(4), strict=False):
        assert torch.equal(x["lq"], y["lq"]) and torch.equal(x["index"], y["index"])


def test_batches_split_ranks_and_resume_at_any_step():
    whole = TrainBatches(10, 2, seed=5, world=1)
    ranks = [TrainBatches(10, 1, seed=5, rank=r, world=2) for r in range(2)]
    it_whole, it_ranks = iter(whole), [iter(r) for r in ranks]
    for _ in range(12):  # crosses epochs (5 steps per epoch)
        expected = next(it_whole)
        got = next(it_ranks[0]) + next(it_ranks[1])
        assert got == expected
    full = iter(TrainBatches(10, 2, seed=5))
    history = [next(full) for _ in range(9)]
    resumed = iter(TrainBatches(10, 2, seed=5, start=6))
    assert [next(resumed) for _ in range(3)] == history[6:]
    epoch0 = [i for batch in history[:5] for _, i in batch]
    assert sorted(epoch0) == list(range(10))  # one epoch visits every face once


def test_config_file_and_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "engine:\n  batch_size: 3\ndata:\n  degradation:\n    first:\n      blur_sigma: [1, 2]\n"
    )
    config = load_config(Stage2Config, path, ["engine.seed=9", "lora_targets=[to_q, to_k]"])
    assert config.engine.batch_size == 3 and config.engine.seed == 9
    assert config.data.degradation.first.blur_sigma == (1.0, 2.0)
    assert config.data.degradation.first.kernel_size == 41  # untouched defaults survive
    assert config.lora_targets == ("to_q", "to_k")
    assert config.engine.output_dir == Path("runs/stage2")
    stage1 = load_config(Stage1Config, None, ["vre.resolution=32", "data.image_size=32"])
    assert stage1.engine.max_steps == stage1.hq_steps + stage1.lq_steps + stage1.assoc_steps
    assert dataclasses.replace(stage1.vre, resolution=512) == Stage1Config().vre


@pytest.mark.parametrize(
    "override",
    [
        "engine.nope=1",
        "engine.batch_size=1.5",
        "data.degradation.first.blur_sigma=[3, 1]",
        "engine.mixed_precision=fp8",
        "data.hflip=maybe",
        "lora_alpha=0",
    ],
)
def test_bad_configs_are_refused(override):
    with pytest.raises(ValueError):
        load_config(Stage2Config, None, [override])
