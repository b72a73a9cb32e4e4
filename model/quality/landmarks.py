"""Landmark distance (the paper's "LMD"): mean pixel distance of 98 facial landmarks.

VQFR's recipe: facexlib's AWing FAN (4 hourglass modules, 98 WFLW landmarks) finds the
landmarks of the restored face and of the HQ face (both 512x512); the score of a pair is the
mean Euclidean distance over the 98 points, in pixels of the 512 image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from model.errors import WeightsError
from model.quality.files import require_files
from weights.strict import check_state_dict

FAN_FILE = "eval/alignment_WFLW_4HG.pth"
NUM_LANDMARKS = 98


def build_fan(device: torch.device):
    from facexlib.alignment import FAN

    return FAN(num_modules=4, num_landmarks=NUM_LANDMARKS, device=str(device))


class LandmarkDistance:
    """`score(restored, hq)`: lists of uint8 (H, W, 3) RGB faces -> (B,) pixels, float64."""

    def __init__(self, network, device: torch.device) -> None:
        self.network = network.to(device).eval().requires_grad_(False)

    @classmethod
    def from_weights(cls, root: Path, device: torch.device) -> LandmarkDistance:
        require_files(root, ["lmd"])
        path = Path(root) / FAN_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        except Exception as e:  # torch raises several types for corrupt or unsafe files
            what = "not a tensors-only checkpoint with 'state_dict'"
            raise WeightsError(f"{path}: {what} ({e})") from e
        network = build_fan(device)
        check_state_dict("AWing FAN (WFLW, 4HG)", network, state)
        network.load_state_dict(state)
        return cls(network, device)

    @torch.inference_mode()
    def landmarks(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) RGB -> (98, 2) float64 (x, y) in pixels."""
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # facexlib reads OpenCV's BGR
        return np.asarray(self.network.get_landmarks(bgr), dtype=np.float64)

    def score(self, restored: list[np.ndarray], hq: list[np.ndarray]) -> torch.Tensor:
        out = []
        for r, h in zip(restored, hq, strict=True):
            distance = np.linalg.norm(self.landmarks(r) - self.landmarks(h), axis=1)
            out.append(float(distance.mean()))
        return torch.tensor(out, dtype=torch.float64)
