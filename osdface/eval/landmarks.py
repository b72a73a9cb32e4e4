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
from torch import nn

from model.errors import WeightsError
from osdface.eval.files import require_files
from weights.strict import check_state_dict

FAN_FILE = "eval/alignment_WFLW_4HG.pth"
NUM_LANDMARKS = 98
FAN_INPUT = 256


def build_fan(device: torch.device) -> nn.Module:
    from facexlib.alignment import FAN

    return FAN(num_modules=4, num_landmarks=NUM_LANDMARKS, device=str(device))


class LandmarkDistance:
    """`score(restored, hq)`: lists of uint8 (H, W, 3) RGB faces -> (B,) pixels, float64."""

    def __init__(self, network: nn.Module, device: torch.device) -> None:
        self.network = network.to(device).eval().requires_grad_(False)
        self.device = device

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
    def landmarks(self, faces: list[np.ndarray]) -> np.ndarray:
        """uint8 (H, W, 3) RGB faces -> (B, 98, 2) float64 (x, y) in pixels of each face.

        The network sees RGB in [0, 1] at 256x256 (facexlib's preprocessing) and returns 64x64
        heatmaps, one per landmark plus a boundary map (dropped).
        """
        size = faces[0].shape[1]
        small = [
            cv2.resize(f, (FAN_INPUT, FAN_INPUT), interpolation=cv2.INTER_LINEAR) for f in faces
        ]
        batch = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float() / 255.0
        outputs, _ = self.network(batch.to(self.device))
        heatmaps = outputs[-1][:, :-1].float().cpu()  # (B, 98, 64, 64)
        return (heatmap_points(heatmaps) * (size / heatmaps.shape[-1])).double().numpy()

    def score(self, restored: list[np.ndarray], hq: list[np.ndarray]) -> torch.Tensor:
        distance = np.linalg.norm(self.landmarks(restored) - self.landmarks(hq), axis=2)
        return torch.from_numpy(distance.mean(axis=1))  # (B,)


def heatmap_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) heatmaps -> (B, N, 2) (x, y) in heatmap pixels.

    The peak of each map, moved a quarter pixel towards its larger neighbour on each axis (not
    moved along an axis where the peak is on the border), plus half a pixel for its centre.
    """
    b, n, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, n, h * w)
    peak = flat.argmax(dim=2)  # (B, N)
    y, x = peak // w, peak % w

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).unsqueeze(-1)
        return flat.gather(2, index).squeeze(-1)

    inside_x = (x > 0) & (x < w - 1)
    inside_y = (y > 0) & (y < h - 1)
    dx = torch.sign(at(y, x + 1) - at(y, x - 1)) * inside_x
    dy = torch.sign(at(y + 1, x) - at(y - 1, x)) * inside_y
    return torch.stack((x + 0.25 * dx + 0.5, y + 0.25 * dy + 0.5), dim=-1)
