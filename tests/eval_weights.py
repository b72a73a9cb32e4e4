"""Random weights for every metric network, written where and as `osdface eval` reads them.

Each file is made from the real architecture class (pyiqa's, torchvision's, facexlib's, the
training code's ArcFace) with seeded random weights, saved under the file name and in the format
of the released file (a state dict, a `.mat`, an `.npz`, a `{"state_dict": ...}` checkpoint),
so the tests load them through the same code the real files go through. CLIP-IQA's CLIP is a
small ResNet CLIP in TorchScript like OpenAI's file: pyiqa builds CLIP from the shapes in its
file, so the small one exercises the same loader. Written once per session (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import scipy.io
import torch

from osdface.eval.files import FFHQ_STATS, METRIC_FILES, PYIQA, TORCHVISION, offline_pyiqa

FID_DIMS = 2048


def _save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in state.items()}, path)


def _nonnegative(state: dict, keys: list[str]) -> dict:
    # LPIPS and DISTS weights are non-negative by construction (their training clamps them);
    # random ones keep that, so a distance can only grow with the difference.
    return {k: (v.abs() if k in keys else v) for k, v in state.items()}


def he_normal(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """He-normal conv/linear weights, unit BatchNorm scales and variances, zero elsewhere.

    Default initialisations shrink activations layer by layer; through Inception's ~100
    layers with eval-mode BatchNorm they vanish, and every image gets the same features.
    He-normal keeps their scale, so FID sees different images as different.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.ndim >= 2:
            state[name] = torch.randn(tensor.shape) * (2.0 / tensor[0].numel()) ** 0.5
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = torch.ones(tensor.shape, dtype=tensor.dtype)
        else:
            state[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)
    return state


def random_features(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """He-normal conv weights in `features`, zeros elsewhere, for a model built on `meta`.

    pyiqa uses only the `features` of torchvision's AlexNet and VGG16; their classifiers
    (most of the 138 M parameters, slow to initialise on a small CPU) only need the right
    shapes for torchvision's strict load.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.ndim >= 2 and name.startswith("features."):
            fan_in = tensor[0].numel()
            state[name] = torch.randn(tensor.shape) * (2.0 / fan_in) ** 0.5
        else:
            state[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)
    return state


def write_torchvision(root: Path) -> None:
    from torchvision import models

    with torch.device("meta"):
        alexnet, vgg16 = models.alexnet(weights=None), models.vgg16(weights=None)
    _save(random_features(alexnet), Path(root) / TORCHVISION / "alexnet-owt-7be5be79.pth")
    _save(random_features(vgg16), Path(root) / TORCHVISION / "vgg16-397923af.pth")


def write_pyiqa(root: Path) -> None:
    import pyiqa

    with offline_pyiqa(root):
        lpips = pyiqa.create_metric("lpips", pretrained=False, device="cpu").net
        state = {k: v for k, v in lpips.state_dict().items() if k.startswith("lin")}
        _save(_nonnegative(state, list(state)), Path(root) / METRIC_FILES["lpips"][0])
        dists = pyiqa.create_metric("dists", pretrained=False, device="cpu").net
        state = {k: v for k, v in dists.state_dict().items() if k in ("alpha", "beta")}
        _save(_nonnegative(state, ["alpha", "beta"]), Path(root) / METRIC_FILES["dists"][0])
        musiq = pyiqa.create_metric("musiq", pretrained=False, device="cpu").net
        _save(musiq.state_dict(), Path(root) / METRIC_FILES["musiq"][0])


def write_niqe(root: Path, rng: np.random.Generator) -> None:
    features = 36  # NIQE's natural-scene statistics: 18 per scale, 2 scales
    a = rng.normal(size=(features, features))
    scipy.io.savemat(
        Path(root) / METRIC_FILES["niqe"][0],
        {
            "mu_prisparam": rng.normal(size=(1, features)),
            "cov_prisparam": a @ a.T + np.eye(features),
        },
    )


def write_clip(root: Path) -> None:
    from pyiqa.archs.clip_model import CLIP

    clip = CLIP(
        embed_dim=64,
        image_resolution=224,
        vision_layers=(1, 1, 1, 1),
        vision_width=8,
        vision_patch_size=None,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
    ).eval()
    # OpenAI ships RN50.pt as a TorchScript archive; pyiqa reads its state dict from that.
    example = (torch.rand(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long))
    path = Path(root) / METRIC_FILES["clipiqa"][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.trace(clip, example), path)


def write_inception(root: Path, rng: np.random.Generator) -> None:
    import pyiqa.archs.inception as inception

    original = inception.load_pretrained_network
    inception.load_pretrained_network = lambda *args, **kwargs: None  # random weights instead
    try:
        network = inception.fid_inception_v3()
    finally:
        inception.load_pretrained_network = original
    _save(he_normal(network), Path(root) / METRIC_FILES["fid"][0])
    a = rng.normal(size=(FID_DIMS, 64)) * 0.05
    np.savez(
        Path(root) / FFHQ_STATS,
        mu=rng.normal(size=FID_DIMS) * 0.1,
        sigma=a @ a.T + 1e-3 * np.eye(FID_DIMS),
    )


def write_identity_and_landmarks(root: Path) -> None:
    from osdface.eval.landmarks import build_fan
    from train.losses import ArcFaceResNet18

    _save(ArcFaceResNet18().state_dict(), Path(root) / METRIC_FILES["deg"][0])
    fan = build_fan(torch.device("cpu"))
    path = Path(root) / METRIC_FILES["lmd"][0]
    torch.save({"state_dict": fan.state_dict()}, path)


def write_maniqa(root: Path) -> None:
    import pyiqa

    from osdface.eval.iqa import _timm_without_imagenet

    with offline_pyiqa(root), _timm_without_imagenet():
        network = pyiqa.create_metric("maniqa", pretrained=False, device="cpu").net
    _save(network.state_dict(), Path(root) / METRIC_FILES["maniqa"][0])


def write_eval_weights(root: Path, *, maniqa: bool = False, seed: int = 0) -> Path:
    """Every metric file under `root/eval` (MANIQA's 540 MB one only when asked)."""
    (Path(root) / PYIQA).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack():
        torch.manual_seed(seed)
        write_torchvision(root)
        write_pyiqa(root)
        write_niqe(root, rng)
        write_clip(root)
        write_inception(root, rng)
        write_identity_and_landmarks(root)
        if maniqa:
            write_maniqa(root)
    return Path(root)
