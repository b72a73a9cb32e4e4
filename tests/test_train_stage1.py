"""Stage 1: the VQ autoencoders, their export into the restorer's VRE, overfitting, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import StateDictMismatchError
from model.networks.vre import VisualRepresentationEmbedder
from tests.train_helpers import (
    TRAIN_VRE,
    fixed_batch,
    one_thread,  # noqa: F401 - autouse fixture
    tiny_data,
    tiny_engine,
    with_overrides,
    write_faces,
)
from train.config import Stage1Config
from train.engine import Engine
from train.losses import VGGPerceptual
from train.stage1 import TOKENIZER_FILE, Stage1Task, run_stage1
from train.stage2 import load_tokenizer
from train.vq import VQAutoencoder


@pytest.fixture(scope="module")
def perceptual() -> VGGPerceptual:
    return VGGPerceptual.random(0)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_faces(tmp_path_factory.mktemp("faces"), 8, size=32)


def make_config(out: Path, faces: Path, **overrides) -> Stage1Config:
    config = Stage1Config(
        vre=TRAIN_VRE,
        hq_steps=2,
        lq_steps=2,
        assoc_steps=2,
        gan_start=10_000,
        disc_channels=8,
        engine=tiny_engine(out),
        data=tiny_data(faces),
    )
    return with_overrides(config, overrides)


def test_tokenizer_export_loads_strictly_into_the_restorers_vre(tmp_path: Path):
    torch.manual_seed(0)
    ae = VQAutoencoder(TRAIN_VRE)
    with torch.no_grad():
        ae.quantize.embedding.weight.normal_()
    path = tmp_path / TOKENIZER_FILE
    save_file(ae.tokenizer_state_dict(), str(path))
    vre = load_tokenizer(VisualRepresentationEmbedder(TRAIN_VRE), path)
    expected = {
        k
        for k in VisualRepresentationEmbedder(TRAIN_VRE).state_dict()
        if not k.startswith("projection.")
    }
    assert set(load_file(str(path))) == expected
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vre.features(x), ae.features(x).flatten(2).transpose(1, 2))
        tokens = vre.tokens(x)
    assert tokens.shape == (2, TRAIN_VRE.num_tokens, TRAIN_VRE.codebook_dim)
    broken = ae.tokenizer_state_dict()
    broken["quant_conv.weight"] = broken["quant_conv.weight"][:, :4].contiguous()
    save_file(broken, str(path))
    with pytest.raises(StateDictMismatchError, match="quant_conv"):
        load_tokenizer(VisualRepresentationEmbedder(TRAIN_VRE), path)


def overfit(tmp_path, faces, perceptual, steps: int, **overrides) -> list[dict[str, float]]:
    config = make_config(tmp_path / "run", faces, lr=4e-3, betas=(0.9, 0.99), **overrides)
    task = Stage1Task(config, Engine(config.engine, "stage1", {}), perceptual)
    batch, gen = fixed_batch(faces), torch.Generator().manual_seed(0)
    return [task.train_step(batch, step, gen) for step in range(steps)]


def test_overfit_one_batch_reconstruction_losses_fall(tmp_path, faces, perceptual):
    history = overfit(tmp_path, faces, perceptual, 30, hq_steps=30, lq_steps=0, assoc_steps=0)
    first, last = history[0], history[-1]
    assert last["hq/l1"] < first["hq/l1"] / 2
    assert last["hq/rec"] - last["hq/l1"] < (first["hq/rec"] - first["hq/l1"]) / 2  # perceptual


def test_overfit_one_batch_vq_loss_falls(tmp_path, faces, perceptual):
    # The VQ term alone: codes move to the features and the features commit to the codes.
    history = overfit(
        tmp_path,
        faces,
        perceptual,
        20,
        hq_steps=20,
        lq_steps=0,
        assoc_steps=0,
        l1_weight=0.0,
        perceptual_weight=0.0,
    )
    assert history[-1]["hq/vq"] < history[0]["hq/vq"] / 4


def test_overfit_one_batch_association_loss_falls(tmp_path, faces, perceptual):
    history = overfit(tmp_path, faces, perceptual, 20, hq_steps=0, lq_steps=0, assoc_steps=20)
    assert all(h["phase"] == 2 for h in history)
    assert history[-1]["assoc"] < history[0]["assoc"] / 2
    assert history[0]["assoc"] > 0.5 * math.log(256)  # 16 x 16 positions, unrelated at first


def test_gan_step_trains_only_the_discriminator_in_its_step(tmp_path, faces, perceptual):
    config = make_config(tmp_path / "run", faces, gan_start=0)
    engine = Engine(config.engine, "stage1", {})
    task = Stage1Task(config, engine, perceptual)
    disc_before = [p.detach().clone() for p in task.disc["hq"].parameters()]
    lq_before = [p.detach().clone() for p in task.ae["lq"].parameters()]
    logs = task.train_step(fixed_batch(faces), 0, torch.Generator().manual_seed(0))
    assert logs["hq/gan_weight"] > 0 and "hq/d_loss" in logs
    assert any(
        not torch.equal(a, b)
        for a, b in zip(disc_before, task.disc["hq"].parameters(), strict=True)
    )
    # The LQ autoencoder is not in the HQ phase: untouched.
    assert all(
        torch.equal(a, b) for a, b in zip(lq_before, task.ae["lq"].parameters(), strict=True)
    )


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, faces, perceptual):
    common = dict(gan_start=1, engine_checkpoint_every=2, engine_val_every=3, engine_ema_decay=0.5)
    full = run_stage1(make_config(tmp_path / "full", faces, **common), perceptual=perceptual)
    part = make_config(tmp_path / "part", faces, engine_stop_after_steps=3, **common)
    assert run_stage1(part, perceptual=perceptual) is None  # stopped early, no export
    resumed = run_stage1(
        make_config(tmp_path / "part", faces, engine_resume="latest", **common),
        perceptual=perceptual,
    )
    for name in (TOKENIZER_FILE, "hq_autoencoder.safetensors", "lq_autoencoder.safetensors"):
        a, b = load_file(str(full.parent / name)), load_file(str(resumed.parent / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for i in range(4):  # both autoencoders and both discriminators, raw (not EMA) weights
        name = f"checkpoints/step-00000006/trainable_{i}.safetensors"
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "val" / "step-00000003.png").is_file()
    # keep_checkpoints=3 by default: step 2, 4, 6 remain of 2, 4, 6 (and 3 in the split run)
    assert [p.name for p in Engine.checkpoints_in(tmp_path / "part")] == [
        "step-00000003",
        "step-00000004",
        "step-00000006",
    ]
