"""Identity distance (the paper's "Deg."): the angle between ArcFace embeddings, in degrees.

VQFR's recipe: each 512 face to grey, resized to 128x128, scaled to [-1, 1], embedded by
GFPGAN's ResNet-18 ArcFace (the network of the training identity loss, train/losses.py), and
the score of a pair is arccos(cosine similarity) in degrees; 0 = same embedding.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from osdface.eval.files import require_files
from train.losses import ArcFaceResNet18, load_frozen, read_state_dict

ARCFACE_FILE = "eval/arcface_resnet18.pth"


class IdentityAngle:
    """`score(restored, hq)`: lists of uint8 (H, W, 3) RGB faces -> (B,) degrees, float64."""

    def __init__(self, network: ArcFaceResNet18, device: torch.device) -> None:
        self.network = network.to(device)
        self.device = device

    @classmethod
    def from_weights(cls, root: Path, device: torch.device) -> IdentityAngle:
        require_files(root, ["deg"])
        state = read_state_dict(Path(root) / ARCFACE_FILE)
        return cls(load_frozen("ArcFace ResNet-18", ArcFaceResNet18(), state), device)

    @staticmethod
    def grey128(rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) RGB -> (1, 128, 128) float32 in [-1, 1]."""
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        grey = cv2.resize(grey, (128, 128), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(grey.astype(np.float32) / 255.0 * 2.0 - 1.0).unsqueeze(0)

    @torch.inference_mode()
    def embed(self, faces: list[np.ndarray]) -> torch.Tensor:
        batch = torch.stack([self.grey128(f) for f in faces]).to(self.device)  # (B, 1, 128, 128)
        return self.network(batch).double().cpu()  # (B, 512)

    def score(self, restored: list[np.ndarray], hq: list[np.ndarray]) -> torch.Tensor:
        cos = F.cosine_similarity(self.embed(restored), self.embed(hq), dim=1)
        return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """The angle between two vectors in degrees (the reference the tests compare with)."""
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))
