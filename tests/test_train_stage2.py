"""Stage 2: gradient flow, the discriminator step, overfitting, export into the restorer, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.image_processor import denormalize
from model.networks.restorer import OSDFaceRestorer
from osdface.cli import main as osdface
from tests.train_helpers import (
    fixed_batch,
    one_thread,  # noqa: F401 - autouse fixture
    restore_args,
    tiny_data,
    tiny_engine,
    with_overrides,
    write_faces,
    write_train_weights,
)
from train.config import Stage2Config
from train.engine import Engine
from train.losses import DISTS, IdentityLoss
from train.stage2 import Stage2Task, run_stage2
from weights.pickle_safe import load_checkpoint, tensors_only


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_train_weights(tmp_path_factory.mktemp("weights32"))


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_faces(tmp_path_factory.mktemp("faces"), 8, size=32)


@pytest.fixture(scope="module")
def nets() -> tuple[IdentityLoss, DISTS]:
    return IdentityLoss.random(0), DISTS.random(0)


def make_config(weights: Path, out: Path, faces: Path, **overrides) -> Stage2Config:
    config = Stage2Config(
        weights_dir=weights,
        init="osdface",
        lora_rank=4,
        lora_alpha=4,
        warmup_steps=0,
        gan_weight=0.5,
        gan_start=0,
        disc_head_channels=8,
        engine=tiny_engine(out),
        data=tiny_data(faces),
    )
    return with_overrides(config, overrides)


def make_task(weights, tmp_path, faces, nets, **overrides) -> Stage2Task:
    config = make_config(weights, tmp_path / "run", faces, **overrides)
    return Stage2Task(config, Engine(config.engine, "stage2", {}), *nets)


def restored(task: Stage2Task, lq: torch.Tensor) -> torch.Tensor:
    """The training-time generator's output as the restorer returns it: [0, 1]."""
    gen = task.engine.unwrap(task.generator).eval()
    with torch.no_grad():
        out, _ = gen(lq)
    gen.train()
    return denormalize(out)


def lora_and_projection(name: str) -> bool:
    return "lora_" in name or name.startswith("vre.projection.")


def generator_grads(task: Stage2Task, batch, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = task.engine.unwrap(task.generator)
    gen.zero_grad(set_to_none=True)
    loss, _, _ = task.generator_loss(batch, 0, torch.Generator().manual_seed(seed))
    loss.backward()
    return {n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None}


def test_the_training_generator_is_the_restorer(weights, tmp_path, faces, nets):
    task = make_task(weights, tmp_path, faces, nets)
    lq = fixed_batch(faces)["lq"]
    reference = OSDFaceRestorer.from_pretrained(weights, merge_lora=False)(lq).images
    torch.testing.assert_close(restored(task, lq), reference, atol=1e-5, rtol=0)


def test_generator_step_gives_gradients_to_lora_and_projection_only(weights, tmp_path, faces, nets):
    task = make_task(weights, tmp_path, faces, nets, id_weight=0.5, per_weight=1.0)
    grads = generator_grads(task, fixed_batch(faces))
    gen = task.engine.unwrap(task.generator)
    trained = {n for n, _ in gen.named_parameters() if lora_and_projection(n)}
    assert any(".lora_A." in n for n in trained) and "vre.projection.conv1.weight" in trained
    assert set(grads) == trained  # every frozen part (UNet, VAE, VRE tokenizer) has none
    assert all(g.abs().sum() > 0 for g in grads.values())
    disc = task.engine.unwrap(task.disc)
    assert all(p.grad is None for p in disc.parameters())  # heads frozen for this pass
    assert all(p.grad is None for p in [*task.identity.parameters(), *task.dists.parameters()])


def test_the_gan_term_reaches_the_lora(weights, tmp_path, faces, nets):
    batch = fixed_batch(faces)
    without = generator_grads(make_task(weights, tmp_path, faces, nets, gan_weight=0.0), batch)
    with_gan = generator_grads(make_task(weights, tmp_path, faces, nets, gan_weight=1.0), batch)
    assert without.keys() == with_gan.keys()
    lora = [n for n in without if "lora_" in n]
    changed = [n for n in lora if not torch.allclose(without[n], with_gan[n], rtol=1e-4, atol=1e-9)]
    assert len(changed) > len(lora) // 2  # the GAN gradient reaches most LoRA layers
    assert not torch.allclose(
        without["vre.projection.conv2.weight"], with_gan["vre.projection.conv2.weight"]
    )


def test_discriminator_step_moves_only_the_heads(weights, tmp_path, faces, nets):
    task = make_task(weights, tmp_path, faces, nets)
    batch, rng = fixed_batch(faces), torch.Generator().manual_seed(0)
    _, x0, _ = task.generator_loss(batch, 0, rng)
    assert x0.requires_grad  # the fake latents carry the generator's graph ...
    gen, disc = task.engine.unwrap(task.generator), task.engine.unwrap(task.disc)
    gen.zero_grad(set_to_none=True)
    before_gen = {n: p.detach().clone() for n, p in gen.named_parameters()}
    before_feat = {n: p.detach().clone() for n, p in disc.features.named_parameters()}
    before_heads = {n: p.detach().clone() for n, p in disc.heads.named_parameters()}
    task.discriminator_step(batch, x0, rng)
    # ... yet no gradient flowed into the generator: the step detached them.
    assert all(p.grad is None for p in gen.parameters())
    assert all(torch.equal(p, before_gen[n]) for n, p in gen.named_parameters())
    assert all(torch.equal(p, before_feat[n]) for n, p in disc.features.named_parameters())
    moved = [n for n, p in disc.heads.named_parameters() if not torch.equal(p, before_heads[n])]
    assert len(moved) == len(before_heads)


def test_overfit_one_batch_each_loss_falls(weights, tmp_path, faces, nets):
    task = make_task(
        weights,
        tmp_path,
        faces,
        nets,
        init="scratch",
        lr=1e-2,
        id_weight=1.0,
        per_weight=5.0,
        gan_weight=0.0,
        engine_grad_clip=0.0,
    )
    batch, rng = fixed_batch(faces), torch.Generator().manual_seed(0)
    history = [task.train_step(batch, step, rng) for step in range(30)]
    first, last = history[0], history[-1]
    assert last["mse"] < first["mse"] / 2
    assert last["id"] < first["id"] / 2
    assert last["ea_dists"] < first["ea_dists"] / 1.4  # random VGG: a higher floor


def test_export_loads_in_the_restorer_and_merges_unchanged(weights, tmp_path, faces, nets):
    # alpha != rank: the export must carry alpha, or the restorer would scale the LoRA wrongly.
    task = make_task(weights, tmp_path, faces, nets, init="scratch", lora_alpha=8, lr=1e-3)
    batch, rng = fixed_batch(faces), torch.Generator().manual_seed(0)
    for step in range(2):
        task.train_step(batch, step, rng)
    export = task.export(tmp_path / "export")
    lora = load_file(str(export / "osdface/pytorch_lora_weights.safetensors"))
    assert all(
        k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora
    )
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # it trained
    config = json.loads((export / "osdface/config.json").read_text())
    assert (config["lora_rank"], config["lora_alpha"]) == (4, 8)
    # The projection also in the released pickle format, read by the safe loader.
    projection = tensors_only(load_checkpoint(export / "osdface/embedding_change_weights.pth"))
    gen = task.engine.unwrap(task.generator)
    assert projection.keys() == gen.vre.projection.state_dict().keys()
    assert all(torch.equal(v, gen.vre.projection.state_dict()[k]) for k, v in projection.items())

    expected = restored(task, batch["lq"])
    unmerged = OSDFaceRestorer.from_pretrained(export, merge_lora=False)(batch["lq"]).images
    torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=0)
    assert osdface(["weights", "merge", "--dir", str(export)]) == 0
    merged = OSDFaceRestorer.from_pretrained(export)
    assert any("unet-merged" in f for f in merged.files)
    torch.testing.assert_close(merged(batch["lq"]).images, expected, atol=1e-4, rtol=0)

    # `osdface restore --aligned` on a PNG of the LQ face writes the same restoration.
    face = (batch["lq"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(face).save(tmp_path / "in/face.png")
    assert osdface(restore_args(tmp_path / "in", tmp_path / "out", export)) == 0
    written = np.asarray(Image.open(tmp_path / "out/face.png")).astype(np.float32) / 255
    reference = restored(task, torch.from_numpy(face).permute(2, 0, 1)[None].float() / 255)
    np.testing.assert_allclose(written, reference[0].permute(1, 2, 0).numpy(), atol=1.01 / 255)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(weights, tmp_path, faces, nets):
    common = dict(
        engine_checkpoint_every=2, engine_val_every=2, engine_ema_decay=0.5, engine_max_steps=4
    )
    full = run_stage2(
        make_config(weights, tmp_path / "full", faces, **common), identity=nets[0], dists=nets[1]
    )
    first = make_config(weights, tmp_path / "part", faces, engine_stop_after_steps=3, **common)
    assert run_stage2(first, identity=nets[0], dists=nets[1]) is None
    resumed = run_stage2(
        make_config(weights, tmp_path / "part", faces, engine_resume="latest", **common),
        identity=nets[0],
        dists=nets[1],
    )
    for name in ("osdface/pytorch_lora_weights.safetensors", "osdface/vre.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for i in (0, 1):  # generator (LoRA + projection) and discriminator heads, raw weights
        name = f"checkpoints/step-00000004/trainable_{i}.safetensors"
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full/val/step-00000002.png").is_file()
