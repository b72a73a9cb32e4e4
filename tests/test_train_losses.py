"""Training losses against hand computations and their invariants; loss-network loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from model.errors import StateDictMismatchError, WeightsNotFoundError
from model.networks.restorer import x0_from_eps
from tests.train_helpers import one_thread  # noqa: F401 - autouse fixture
from train.discriminator import LatentDiscriminator, PatchDiscriminator, patch_d_loss
from train.losses import (
    DISTS,
    TRAIN_WEIGHT_FILES,
    ArcFaceResNet18,
    IdentityLoss,
    VGGPerceptual,
    adaptive_gan_weight,
    association_loss,
    ea_dists,
    hinge_d_loss,
    hinge_g_loss,
    psnr,
    sobel_luma,
    softplus_d_loss,
    softplus_g_loss,
    vgg_features,
)
from train.vq import VectorQuantizer

REPO = Path(__file__).resolve().parents[1]


def test_vq_loss_and_straight_through_by_hand():
    vq = VectorQuantizer(size=3, dim=2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]]))
    # Two positions (B=1, C=2, H=1, W=2): (0.9, 1.2) -> code 1, (-1.5, 0.4) -> code 2.
    z = torch.tensor([[[[0.9, -1.5]], [[1.2, 0.4]]]], requires_grad=True)
    z_q, loss, index = vq(z)
    value = float(loss.detach())
    assert index.tolist() == [[1, 2]]
    e = torch.tensor([[1.0, 1.0], [-2.0, 0.5]])
    zz = torch.tensor([[0.9, 1.2], [-1.5, 0.4]])
    sq = ((zz - e) ** 2).sum() / 4  # mean over the 4 elements
    assert value == pytest.approx((1 + 0.25) * float(sq), rel=1e-6)
    torch.testing.assert_close(z_q.detach()[0, :, 0].t(), e)
    # Straight-through: d(sum z_q)/dz = 1; commitment adds beta * 2 (z - e) / n.
    (z_q.sum() + loss).backward()
    expected_z = 1 + 0.25 * 2 * (zz - e) / 4
    torch.testing.assert_close(z.grad[0, :, 0].t(), expected_z)
    expected_codes = torch.zeros(3, 2)
    expected_codes[1:] = 2 * (e - zz) / 4  # the codebook term moves codes towards z
    torch.testing.assert_close(vq.embedding.weight.grad, expected_codes)


def test_association_loss_by_hand_and_limits():
    # N = 2 positions with unit features (1, 0) and (0.6, 0.8): cosines [[1, .6], [.6, 1]].
    hq = torch.tensor([[1.0, 0.0], [0.6, 0.8]]).t().reshape(1, 2, 1, 2)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0.6 / t)))
    assert float(association_loss(hq, hq * 2.0, t)) == pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4096, 8, 8, generator=g), torch.randn(2, 4096, 8, 8, generator=g)
    assert float(association_loss(a, b)) == pytest.approx(math.log(64), abs=0.1)
    assert float(association_loss(a, a * 3.0)) < 1e-3  # scale-free: features are normalised
    # Symmetric: swapping HQ and LQ gives the same loss.
    assert float(association_loss(a, b)) == pytest.approx(float(association_loss(b, a)), rel=1e-5)


def test_dists_is_zero_on_identical_images_and_positive_otherwise():
    dists = DISTS.random(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(dists(x, x), torch.zeros(2), atol=1e-6)
    assert float(ea_dists(dists, x, x)) == pytest.approx(0.0, abs=1e-6)
    d = dists(x, y)
    assert (d > 0.01).all() and (d < 1).all()
    assert float(dists(x, (x + 0.02 * y).clamp(0, 1)).mean()) < float(d.mean())
    assert not any(p.requires_grad for p in dists.parameters())


def test_dists_alpha_beta_weighting_by_hand():
    # With all alpha on the raw image's channels, DISTS reduces to the mean-similarity term.
    dists = DISTS.random(0)
    with torch.no_grad():
        dists.alpha.zero_()
        dists.beta.zero_()
        dists.alpha[0, :3] = 1.0
    x = torch.full((1, 3, 8, 8), 0.2)
    y = torch.full((1, 3, 8, 8), 0.6)
    s = (2 * 0.2 * 0.6 + 1e-6) / (0.2**2 + 0.6**2 + 1e-6)
    assert float(dists(x, y)) == pytest.approx(1 - s, rel=1e-4)


def test_sobel_of_a_ramp():
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)  # d/dx = 1/15
    edges = sobel_luma(ramp)
    # Sobel-x of a unit-slope ramp is 8 per pixel; divided by 8 -> the slope itself.
    torch.testing.assert_close(
        edges[0, :, 4:-4, 4:-4], torch.full((3, 8, 8), 1 / 15), atol=1e-5, rtol=0
    )


def test_identity_loss_is_zero_on_the_same_face():
    loss = IdentityLoss.random(0)
    g = torch.Generator().manual_seed(2)
    x, y = (
        torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
    )
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(x, y)) > 1e-3
    loss.train()
    assert not loss.network.training  # BatchNorm statistics never move


def test_arcface_architecture_matches_gfpgan_names_and_shapes():
    state = ArcFaceResNet18().state_dict()
    params = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert tuple(state["conv1.weight"].shape) == (64, 1, 3, 3)
    assert tuple(state["fc5.weight"].shape) == (512, 512 * 8 * 8)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(state["layer1.1.bn0.running_var"].shape) == (64,)
    assert "layer1.0.downsample.0.weight" not in state  # 64 -> 64 at stride 1: no shortcut conv
    assert "layer4.1.prelu.weight" in state and "bn5.running_mean" in state
    # 4 stages x 2 IR blocks x (3 BN x 4 + 2 conv + 1 PReLU) + 3 downsamples x (conv + 4 BN)...
    assert len(params) == 4 * 2 * (3 * 4 + 2 + 1) + 3 * (1 + 4) + (1 + 4 + 1) + 4 + 2 + 4
    out = ArcFaceResNet18().eval()(torch.zeros(2, 1, 128, 128))
    assert out.shape == (2, 512)


def test_x0_formula_equals_the_diffusers_scheduler_step():
    scheduler = DDPMScheduler.from_pretrained(REPO / "model/configs/sd21-base/scheduler")
    alpha_bar = float(scheduler.alphas_cumprod[399].double())
    assert alpha_bar == pytest.approx(0.426086, abs=1e-6)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    reference = scheduler.step(eps, 399, z).pred_original_sample
    torch.testing.assert_close(x0_from_eps(z, eps, alpha_bar), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        x0_from_eps(z, eps, alpha_bar), 1.531973 * z - 1.160578 * eps, atol=1e-5, rtol=0
    )


def test_adaptive_weight_is_the_gradient_norm_ratio_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    x = torch.tensor([1.0, -1.0])
    rec = (w @ x).pow(2).sum()  # d/dw = 2 (w x) x^T: rows (-2, 2)(-2, 2) -> norm 4
    g = (w * 3).sum()  # d/dw = 3 everywhere -> norm 6
    weight = adaptive_gan_weight(rec, g, w, 0.8)
    assert float(weight) == pytest.approx(0.8 * 4 / (6 + 1e-4), rel=1e-6)
    assert not weight.requires_grad


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    assert float(hinge_g_loss(fake)) == pytest.approx(1.5)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert float(softplus_d_loss(real, fake)) == pytest.approx(
        (sp(-2) + sp(-0.5)) / 2 + (sp(-3) + sp(0)) / 2, rel=1e-6
    )
    assert float(softplus_g_loss(fake)) == pytest.approx((sp(3) + sp(0)) / 2, rel=1e-6)


def test_patch_discriminator_shapes_and_detached_fake():
    disc = PatchDiscriminator(channels=8, layers=3)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert disc(real).shape == (2, 1, 2, 2)
    patch_d_loss(disc, real, fake).backward()
    assert fake.grad is None and disc.main[0].weight.grad is not None


def test_psnr_by_hand():
    x = torch.zeros(1, 3, 4, 4)
    assert float(psnr(x, x + 0.1)) == pytest.approx(20.0, rel=1e-5)


def test_latent_discriminator_noise_matches_the_scheduler():
    from diffusers import UNet2DConditionModel

    from tests.tiny_weights import TINY_UNET

    scheduler = DDPMScheduler.from_pretrained(REPO / "model/configs/sd21-base/scheduler")
    unet = UNet2DConditionModel(**TINY_UNET)
    disc = LatentDiscriminator(unet, scheduler.alphas_cumprod, head_channels=8, timesteps=(10, 990))
    z = torch.randn(3, 4, 4, 4)
    gen = torch.Generator().manual_seed(0)
    noised, t = disc.noise(z, gen)
    gen = torch.Generator().manual_seed(0)
    t_ref = torch.randint(10, 991, (3,), generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(noised, scheduler.add_noise(z, eps, t_ref), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in disc.features.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())


# --- loading from the weights folder ---------------------------------------------------------


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_loss_networks_load_strictly_from_the_weights_folder(tmp_path: Path):
    train = tmp_path / "train"
    vgg19 = {f"features.{k}": v for k, v in vgg_features("vgg19").state_dict().items()}
    vgg19["classifier.0.weight"] = torch.zeros(1)  # the file holds the classifier: ignored
    _save(train / TRAIN_WEIGHT_FILES["vgg19"], vgg19)
    _save(
        train / TRAIN_WEIGHT_FILES["vgg16"],
        {f"features.{k}": v for k, v in vgg_features("vgg16").state_dict().items()},
    )
    _save(
        train / TRAIN_WEIGHT_FILES["dists"],
        {"alpha": torch.full((1, 1475, 1, 1), 0.1), "beta": torch.full((1, 1475, 1, 1), 0.2)},
    )
    arc = ArcFaceResNet18().state_dict()
    _save(train / TRAIN_WEIGHT_FILES["arcface"], {f"module.{k}": v for k, v in arc.items()})

    perceptual = VGGPerceptual.from_weights(tmp_path)
    torch.testing.assert_close(perceptual.features[34].weight, vgg19["features.34.weight"])
    dists = DISTS.from_weights(tmp_path)
    assert float(dists.beta[0, 0]) == pytest.approx(0.2)
    identity = IdentityLoss.from_weights(tmp_path)
    torch.testing.assert_close(identity.network.fc5.weight, arc["fc5.weight"])

    del arc["fc5.weight"]
    _save(train / TRAIN_WEIGHT_FILES["arcface"], arc)
    with pytest.raises(StateDictMismatchError, match=r"fc5\.weight"):
        IdentityLoss.from_weights(tmp_path)
    (train / TRAIN_WEIGHT_FILES["vgg16"]).unlink()
    with pytest.raises(WeightsNotFoundError, match="vgg16"):
        DISTS.from_weights(tmp_path)


def test_losses_give_gradients_to_the_image_only():
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    gt = torch.rand(1, 3, 32, 32) * 2 - 1
    for loss in (
        VGGPerceptual.random(0)(x, gt),
        IdentityLoss.random(0)(x, gt),
        ea_dists(DISTS.random(0), x * 0.5 + 0.5, gt * 0.5 + 0.5),
    ):
        x.grad = None
        loss.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert F.l1_loss(x, x).item() == 0.0
