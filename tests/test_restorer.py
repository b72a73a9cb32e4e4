"""The one-step restorer against an independent reference, and its invariants."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from bench.baseline import AuthorsStyleBaseline
from model.errors import InvalidInputError
from model.networks.restorer import OSDFaceRestorer, x0_from_eps
from tests.reference_osdface import reference_osdface
from weights.layout import WeightsLayout
from weights.load import alpha_bar


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth, face-sized structure rather than white noise: closer to real inputs
    low = torch.rand(n, 3, 32, 32, generator=g)
    return torch.nn.functional.interpolate(low, size=512, mode="bilinear").clamp(0, 1)


@pytest.fixture(scope="module")
def reference(tiny_weights_dir: Path) -> AuthorsStyleBaseline:
    osd = tiny_weights_dir / "osdface"
    # the test wrote these pickles itself, so a full unpickle is fine here (never in model/)
    vre = torch.load(osd / "associate_2.ckpt", weights_only=False)["state_dict"]
    proj = torch.load(osd / "embedding_change_weights.pth", weights_only=False)
    return reference_osdface(tiny_weights_dir, vre, proj)


# CPU convolutions pick batch-size-dependent kernels; their fp32 rounding differences grow
# through the tiny random VAE decoder to ~1e-4 on the output. Same-batch comparisons are exact.
BATCH_ATOL = 3e-4


def test_matches_independent_reference(tiny_restorer: OSDFaceRestorer, reference) -> None:
    faces = _faces(2)
    batched = tiny_restorer(faces).images
    for i in range(2):
        ref = reference(faces[i : i + 1], latent="mode").images[0]
        single = tiny_restorer(faces[i : i + 1]).images[0]
        assert (single - ref).abs().max().item() < 1e-5
        assert (batched[i] - ref).abs().max().item() < BATCH_ATOL
    assert (batched - faces).abs().mean() > 1e-2, "the restorer must change its input"


def test_batch_equals_single_calls(tiny_restorer: OSDFaceRestorer) -> None:
    faces = _faces(3, seed=1)
    batched = tiny_restorer(faces).images
    singles = torch.cat([tiny_restorer(faces[i : i + 1]).images for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=BATCH_ATOL, rtol=0)


def test_merged_equals_unmerged_lora(tiny_weights_dir: Path, tiny_restorer) -> None:
    unmerged = OSDFaceRestorer.from_pretrained(tiny_weights_dir, merge_lora=False)
    assert any("lora" in n for n, _ in unmerged.unet.named_modules())
    assert not any("lora" in n for n, _ in tiny_restorer.unet.named_modules())
    faces = _faces(1, seed=2)
    torch.testing.assert_close(
        unmerged(faces).images, tiny_restorer(faces).images, atol=1e-5, rtol=0
    )


def test_output_contract(tiny_restorer: OSDFaceRestorer) -> None:
    assert tiny_restorer.fast is None  # the plain path: no fast path object at all
    assert tiny_restorer.describe()["fast_path"] == {"enabled": False}
    out = tiny_restorer(_faces(1))
    assert out.images.shape == (1, 3, 512, 512)
    assert out.images.dtype == torch.float32 and out.images.device.type == "cpu"
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0
    assert set(out.timings) == {"vre", "vae_encode", "unet", "vae_decode"}


def test_sample_latent_is_seeded(tiny_restorer: OSDFaceRestorer) -> None:
    faces = _faces(1, seed=3)
    a = tiny_restorer(faces, latent="sample", seed=7).images
    b = tiny_restorer(faces, latent="sample", seed=7).images
    c = tiny_restorer(faces, latent="sample", seed=8).images
    mode = tiny_restorer(faces).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, mode)


@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(1, 3, 256, 256),
        torch.rand(3, 512, 512),
        torch.rand(0, 3, 512, 512),
        torch.rand(1, 4, 512, 512),
        torch.full((1, 3, 512, 512), 1.5),
        torch.full((1, 3, 512, 512), float("nan")),
        torch.zeros(1, 3, 512, 512, dtype=torch.uint8),
    ],
)
def test_rejects_inputs_outside_the_contract(tiny_restorer, bad: torch.Tensor) -> None:
    with pytest.raises(InvalidInputError):
        tiny_restorer(bad)


def test_alpha_bar_from_scheduler_config(tiny_weights_dir: Path) -> None:
    a = alpha_bar(WeightsLayout(tiny_weights_dir), 399)
    assert a == pytest.approx(0.426086, abs=1e-6)
    assert 1 / math.sqrt(a) == pytest.approx(1.531973, abs=1e-6)
    assert math.sqrt(1 - a) / math.sqrt(a) == pytest.approx(1.160578, abs=1e-6)


def test_x0_formula_equals_diffusers_step(tiny_weights_dir: Path) -> None:
    scheduler = DDPMScheduler.from_pretrained(tiny_weights_dir / "sd21-base/scheduler")
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    expected = scheduler.step(eps, 399, z).pred_original_sample
    a = float(scheduler.alphas_cumprod[399].double())
    torch.testing.assert_close(x0_from_eps(z, eps, a), expected, atol=1e-5, rtol=1e-5)
