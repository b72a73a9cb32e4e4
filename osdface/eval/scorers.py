"""Per-image metrics by name, built once, scored a batch at a time.

Names: psnr, ssim (no files), lpips, dists, deg, lmd (need the HQ face), musiq, niqe, clipiqa,
maniqa (restored face alone). FID is set-level (osdface/eval/fid.py) and listed apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from osdface.eval import fidelity
from osdface.eval.iqa import build_iqa
from osdface.eval.names import NEEDS_HQ, PER_IMAGE, PYIQA_METRICS


def to_tensor(faces: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) RGB list -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 255.0


class Metric(Protocol):
    """A built metric: pyiqa's take (B, 3, H, W) tensors, DEG and LMD lists of uint8 faces."""

    def score(self, restored: Any, hq: Any, /) -> torch.Tensor: ...


@dataclass
class Scorers:
    """The per-image metrics asked for; `score` returns {name: [value per face]}."""

    names: list[str]
    device: torch.device
    _networks: dict[str, Metric] = field(default_factory=dict)

    @classmethod
    def build(cls, names: list[str], root: Path, device: torch.device) -> Scorers:
        scorers = cls([n for n in names if n in PER_IMAGE], device)
        for name in scorers.names:
            if name in PYIQA_METRICS:
                scorers._networks[name] = build_iqa(name, root, device)
            elif name == "deg":
                from osdface.eval.identity import IdentityAngle

                scorers._networks[name] = IdentityAngle.from_weights(root, device)
            elif name == "lmd":
                from osdface.eval.landmarks import LandmarkDistance

                scorers._networks[name] = LandmarkDistance.from_weights(root, device)
        return scorers

    def score(
        self, restored: list[np.ndarray], hq: list[np.ndarray] | None
    ) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        tensors = None
        for name in self.names:
            if name in NEEDS_HQ and hq is None:
                raise ValueError(f"{name} needs the HQ reference faces (--hq)")
            if name in ("psnr", "ssim") and hq is not None:  # both need hq: refused above
                fn = fidelity.psnr if name == "psnr" else fidelity.ssim
                out[name] = [fn(r, h) for r, h in zip(restored, hq, strict=True)]
            elif name in PYIQA_METRICS:
                if tensors is None:
                    tensors = (to_tensor(restored), to_tensor(hq) if hq is not None else None)
                out[name] = self._networks[name].score(*tensors).tolist()
            else:
                out[name] = self._networks[name].score(restored, hq).tolist()
        return out
