"""Weights: released formats load strictly, pickles never run code, errors name the problem."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from model.config import OSDFaceConfig
from model.errors import (
    LoraKeyError,
    StateDictMismatchError,
    WeightsError,
    WeightsNotFoundError,
)
from model.networks.restorer import OSDFaceRestorer
from tests.tiny_weights import TINY_CONFIG, write_tiny_weights
from weights.convert import convert_released
from weights.layout import SAFETENSORS_NAME, WeightsLayout
from weights.load import load_vre
from weights.lora import check_lora, merge_lora
from weights.pickle_safe import Skipped, load_checkpoint


@pytest.fixture
def released(tmp_path: Path) -> WeightsLayout:
    """A fresh released-layout folder (not converted, not merged) per test."""
    return WeightsLayout(write_tiny_weights(tmp_path / "w", prepare=False))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/osdface-pwned",))


def test_lightning_checkpoint_loads_tensors_and_skips_objects(released: WeightsLayout) -> None:
    ckpt = load_checkpoint(released.released_vre)
    assert isinstance(ckpt["state_dict"]["vqvae_LQ.quantize.embedding.weight"], torch.Tensor)
    assert isinstance(ckpt["hyper_parameters"], Skipped)
    assert "argparse.Namespace" in repr(ckpt["hyper_parameters"])
    reference = torch.load(released.released_vre, weights_only=False)["state_dict"]
    for key, tensor in reference.items():
        assert torch.equal(ckpt["state_dict"][key], tensor), key


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    marker = Path("/tmp/osdface-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    tensors = {
        "w": torch.ones(2),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "half_view": torch.arange(12, dtype=torch.float16).reshape(3, 4)[:, 1:3],
    }
    torch.save({**tensors, "payload": _Exploit()}, path)
    loaded = load_checkpoint(path)
    assert not marker.exists()
    assert isinstance(loaded["payload"], Skipped) and "posix.system" in repr(loaded["payload"])
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].dtype == tensor.dtype, key


def test_convert_writes_every_vre_tensor(released: WeightsLayout) -> None:
    convert_released(released, TINY_CONFIG)
    state = load_file(str(released.vre))
    assert not any(k.startswith(("decoder.", "post_quant_conv.", "vqvae_")) for k in state)
    vre = load_vre(released, TINY_CONFIG)
    assert set(state) == set(vre.state_dict())


def _rewrite_released_vre(layout: WeightsLayout, edit) -> None:
    ckpt = torch.load(layout.released_vre, weights_only=False)
    edit(ckpt["state_dict"])
    torch.save(ckpt, layout.released_vre)


def test_missing_tensor_is_named(released: WeightsLayout) -> None:
    _rewrite_released_vre(released, lambda s: s.pop("vqvae_LQ.encoder.conv_out.bias"))
    with pytest.raises(StateDictMismatchError, match=r"missing 1: encoder\.conv_out\.bias"):
        convert_released(released, TINY_CONFIG)


def test_unexpected_tensor_is_named(released: WeightsLayout) -> None:
    _rewrite_released_vre(released, lambda s: s.update({"vqvae_LQ.encoder.extra": torch.ones(1)}))
    with pytest.raises(StateDictMismatchError, match=r"unexpected 1: encoder\.extra"):
        convert_released(released, TINY_CONFIG)


def test_wrong_shape_is_named(released: WeightsLayout) -> None:
    key = "vqvae_LQ.quantize.embedding.weight"
    _rewrite_released_vre(released, lambda s: s.update({key: torch.zeros(32, 16)}))
    with pytest.raises(
        StateDictMismatchError, match=r"quantize\.embedding\.weight \(file \(32, 16\)"
    ):
        convert_released(released, TINY_CONFIG)


def test_wrong_shape_in_diffusers_folder_is_named(released: WeightsLayout) -> None:
    path = released.vae_dir / SAFETENSORS_NAME
    state = load_file(str(path))
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:2].contiguous()
    del state["decoder.conv_out.bias"]
    save_file(state, str(path))
    convert_released(released, TINY_CONFIG)
    with pytest.raises(StateDictMismatchError) as err:
        OSDFaceRestorer.from_pretrained(released.root)
    assert "decoder.conv_out.bias" in str(err.value) and "encoder.conv_in.weight" in str(err.value)


def test_stray_lora_key_is_an_error(released: WeightsLayout) -> None:
    lora = load_file(str(released.lora))
    lora["unet.down_blocks.0.no_such_layer.lora_A.weight"] = torch.zeros(4, 8)
    unet = UNet2DConditionModel.from_pretrained(released.unet_dir)
    with pytest.raises(LoraKeyError, match="no_such_layer"):
        check_lora(unet, lora, TINY_CONFIG.lora_rank)


def test_lora_shape_mismatch_is_an_error(released: WeightsLayout) -> None:
    lora = load_file(str(released.lora))
    key = next(k for k in lora if k.endswith("lora_A.weight"))
    lora[key] = torch.zeros(4, 3)
    unet = UNet2DConditionModel.from_pretrained(released.unet_dir)
    with pytest.raises(
        LoraKeyError, match=key.removeprefix("unet.").removesuffix(".lora_A.weight")
    ):
        check_lora(unet, lora, TINY_CONFIG.lora_rank)


def test_merge_equals_w_plus_scaled_b_at_a(released: WeightsLayout) -> None:
    config = OSDFaceConfig(lora_rank=4, lora_alpha=8, vre=TINY_CONFIG.vre)  # scale 2
    lora = load_file(str(released.lora))
    base = UNet2DConditionModel.from_pretrained(released.unet_dir).state_dict()
    merged = merge_lora(UNet2DConditionModel.from_pretrained(released.unet_dir), lora, config)
    merged_state = merged.state_dict()
    assert set(merged_state) == set(base)
    for key in [k for k in lora if "lora_A" in k]:
        module = key[len("unet.") : -len(".lora_A.weight")]
        a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
        w = base[f"{module}.weight"]
        expected = w + 2.0 * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
        torch.testing.assert_close(merged_state[f"{module}.weight"], expected, atol=1e-6, rtol=0)


def test_truncated_files_are_named(released: WeightsLayout) -> None:
    data = released.released_vre.read_bytes()
    released.released_vre.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"associate_2\.ckpt"):
        convert_released(released, TINY_CONFIG)
    released.released_vre.write_bytes(data)
    convert_released(released, TINY_CONFIG)
    lora = released.lora.read_bytes()
    released.lora.write_bytes(lora[:100])
    with pytest.raises(WeightsError, match=r"pytorch_lora_weights\.safetensors"):
        OSDFaceRestorer.from_pretrained(released.root)


def test_loading_never_converts_the_released_pickles(released: WeightsLayout) -> None:
    """The pickles are there, but only `osdface weights convert` reads them."""
    with pytest.raises(WeightsNotFoundError, match=r"vre\.safetensors.*osdface weights convert"):
        OSDFaceRestorer.from_pretrained(released.root)
    assert not released.vre.exists()


def test_missing_file_says_what_to_run(released: WeightsLayout) -> None:
    released.released_vre.unlink()
    with pytest.raises(WeightsNotFoundError, match=r"vre\.safetensors"):
        OSDFaceRestorer.from_pretrained(released.root)
    shutil.rmtree(released.vae_dir)
    with pytest.raises(WeightsNotFoundError):
        OSDFaceRestorer.from_pretrained(released.root)


def test_restricted_unpickler_rejects_non_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError, match=r"plain\.pkl"):
        load_checkpoint(path)
