"""The paper's pyiqa metrics, built offline from the weights folder.

LPIPS (AlexNet, v0.1), DISTS, MUSIQ (KonIQ), NIQE, CLIP-IQA (RN50) and MANIQA (KonIQ) are
pyiqa's own networks and preprocessing (`pyiqa.create_metric`), so scores match what the paper
computed with pyiqa. Only where their files come from differs (osdface/eval/files.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model.errors import StateDictMismatchError
from osdface.eval.files import METRIC_FILES, offline_pyiqa, require_files
from osdface.eval.names import FULL_REFERENCE

logger = logging.getLogger(__name__)


@dataclass
class IQAMetric:
    """One pyiqa metric. `score(restored, hq)`: (B, 3, H, W) float [0, 1] RGB -> (B,) float64."""

    name: str
    network: torch.nn.Module
    full_reference: bool

    @torch.inference_mode()
    def score(self, restored: torch.Tensor, hq: torch.Tensor | None = None) -> torch.Tensor:
        if self.full_reference:
            if hq is None:
                raise ValueError(f"{self.name} needs the HQ reference images (--hq)")
            out = self.network(restored, hq)
        else:
            out = self.network(restored)
        return out.detach().reshape(restored.shape[0], -1)[:, 0].double().cpu()


@contextlib.contextmanager
def _timm_without_imagenet() -> Iterator[None]:
    """MANIQA's checkpoint holds its ViT's weights (pyiqa loads it strictly), so timm's
    ImageNet ViT is never needed: build the ViT empty instead of fetching it from the Hub."""
    import timm

    original = timm.create_model

    def create_model(*args, **kwargs):
        return original(*args, **{**kwargs, "pretrained": False})  # pyiqa passes True

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


@contextlib.contextmanager
def _clip_importable() -> Iterator[None]:
    """openai-clip imports `packaging` through `pkg_resources`, which setuptools 81 removed;
    that import is its only use of it. Where pkg_resources is gone, serve that one attribute
    from the real `packaging` while clip is imported, and take the name away afterwards."""
    import importlib.util

    if "clip" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    import packaging.version

    module = types.ModuleType("pkg_resources", "only `packaging`, for openai-clip's import")
    module.__dict__["packaging"] = packaging
    sys.modules["pkg_resources"] = module
    try:
        import clip  # noqa: F401 - imported here so pyiqa finds it in sys.modules

        yield
    finally:
        sys.modules.pop("pkg_resources", None)


def _overrides(name: str, root: Path) -> dict:
    if name == "clipiqa":
        # A path (not "RN50") makes CLIP read the file instead of checking it against the URL's
        # sha256 and re-downloading; `osdface weights fetch --eval` checks that sha256.
        return {"backbone": str(root / "eval/clip/RN50.pt")}
    return {}


# pyiqa loads these partial checkpoints with strict=False (the backbone comes from torchvision),
# which would silently keep random layers if a file did not match: check their keys ourselves.
PARTIAL_CHECKPOINTS = {"lpips": "lin", "dists": ""}


def check_partial_checkpoint(name: str, network: torch.nn.Module, path: Path) -> None:
    """Every tensor of the file has a same-shaped place in the network, and every network
    tensor the file should provide (by prefix) is in it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a tensors-only file: pyiqa has loaded it, nothing more to check
        logger.debug("%s: not readable without pickle; key check skipped", path)
        return
    state = {k.removeprefix("module."): v for k, v in state.get("params", state).items()}
    expected = network.state_dict()
    prefix = PARTIAL_CHECKPOINTS[name]
    wanted = [k for k in expected if k.startswith(prefix)] if prefix else list(state)
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(f"{name} ({path.name})", missing, unexpected, mismatched)


def build_iqa(name: str, root: Path, device: torch.device) -> IQAMetric:
    """pyiqa metric `name` on `device`, every file from `root/eval`; never downloads."""
    import pyiqa

    require_files(root, [name])
    guard = {"maniqa": _timm_without_imagenet, "clipiqa": _clip_importable}.get(
        name, contextlib.nullcontext
    )()
    with offline_pyiqa(root), guard:
        metric = pyiqa.create_metric(name, device=device, **_overrides(name, root))
    metric.eval()
    if name in PARTIAL_CHECKPOINTS:
        check_partial_checkpoint(name, metric.net, Path(root) / METRIC_FILES[name][0])
    return IQAMetric(name, metric, name in FULL_REFERENCE)
