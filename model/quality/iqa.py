"""The paper's pyiqa metrics, built offline from the weights folder.

LPIPS (AlexNet, v0.1), DISTS, MUSIQ (KonIQ), NIQE, CLIP-IQA (RN50) and MANIQA (KonIQ) are
pyiqa's own networks and preprocessing (`pyiqa.create_metric`), so scores match what the paper
computed with pyiqa. Only where their files come from differs (model/quality/files.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model.quality.files import offline_pyiqa, require_files

FULL_REFERENCE = ("lpips", "dists")
NO_REFERENCE = ("musiq", "niqe", "clipiqa", "maniqa")
PYIQA_METRICS = FULL_REFERENCE + NO_REFERENCE


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
    timm.create_model = functools.partial(original, pretrained=False)
    try:
        yield
    finally:
        timm.create_model = original


def _overrides(name: str, root: Path) -> dict:
    if name == "clipiqa":
        # A path (not "RN50") makes CLIP read the file instead of checking it against the URL's
        # sha256 and re-downloading; `osdface weights fetch --eval` checks that sha256.
        return {"backbone": str(root / "eval/clip/RN50.pt")}
    return {}


def build_iqa(name: str, root: Path, device: torch.device) -> IQAMetric:
    """pyiqa metric `name` on `device`, every file from `root/eval`; never downloads."""
    import pyiqa

    require_files(root, [name])
    guard = _timm_without_imagenet() if name == "maniqa" else contextlib.nullcontext()
    with offline_pyiqa(root), guard:
        metric = pyiqa.create_metric(name, device=device, **_overrides(name, root))
    metric.eval()
    return IQAMetric(name, metric, name in FULL_REFERENCE)
