"""Face detection in whole photos: RetinaFace with stateless pre- and post-processing.

Everything here is stateless per call, so one `FaceDetector` serves concurrent threads:
facexlib's `RetinaFace.detect_faces` stores the resize factor, scales and priors of the current
image on the module, and `FaceRestoreHelper` keeps the current image's faces; neither is used.
Only the RetinaFace network (its layers and `forward`) comes from facexlib; the pre- and
post-processing around it (input normalisation, priors, thresholds, NMS) is written here as
pure functions.

Conventions: images are (H, W, 3) uint8 RGB; BGR exists only at the network's input. Points
are (x, y) in pixels. An "affine" is a (2, 3) float64 matrix mapping image coordinates to
aligned-crop coordinates (OpenCV's convention: pixel i has coordinate i).
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import torch
import torchvision
from facexlib.detection.retinaface import RetinaFace, generate_config
from facexlib.detection.retinaface_utils import decode, decode_landm

from model.config import DetectorConfig, DetectorName
from model.errors import (
    ChecksumMismatchError,
    DetectorError,
    InvalidInputError,
    WeightsError,
    WeightsNotFoundError,
)
from model.media.faces.align import check_rgb
from model.media.faces.detectors import DETECTORS
from weights.layout import sha256_file
from weights.strict import check_state_dict

logger = logging.getLogger(__name__)

# RetinaFace expects BGR pixels in 0..255 minus the training images' per-channel mean (B, G, R).
_BGR_MEAN: Final[tuple[float, float, float]] = (104.0, 117.0, 123.0)
_NMS_IOU: Final[float] = 0.4


@dataclass(frozen=True)
class DetectedFace:
    """One face: box (x1, y1, x2, y2) and 5 landmarks in input pixels, detector confidence."""

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def landmarks_array(self) -> np.ndarray:
        """(5, 2) float64 (x, y)."""
        return np.asarray(self.landmarks, dtype=np.float64)

    def to_json(self) -> dict[str, object]:
        """The face as answers and reports list it: box and landmarks in pixels to 2 decimals
        (a hundredth of a pixel is past the detector's precision), score to 4."""
        return {
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


class FaceDetector:
    """RetinaFace with stateless pre- and post-processing; safe to call from several threads."""

    def __init__(
        self,
        network: RetinaFace,
        name: str,
        *,
        threshold: float = DetectorConfig.threshold,
        max_side: int = DetectorConfig.max_side,
        min_face_size: int = DetectorConfig.min_face_size,
        min_side: int = DetectorConfig.min_side,
    ) -> None:
        if name not in DETECTORS:
            raise InvalidInputError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
        if not 0.0 < threshold < 1.0:
            raise InvalidInputError(f"detection threshold must be in (0, 1), got {threshold}")
        if max_side < 32 or min_face_size < 1:
            raise InvalidInputError(
                f"need max_side >= 32 and min_face_size >= 1, got {max_side}, {min_face_size}"
            )
        self.network = network.eval()
        self.name: DetectorName = name
        self.threshold = threshold
        self.max_side = max_side
        self.min_face_size = min_face_size
        self.min_side = min_side  # 0: never upscale
        config = generate_config(DETECTORS[name].network)
        self._steps = tuple(config["steps"])
        self._min_sizes = tuple(tuple(sizes) for sizes in config["min_sizes"])
        self._variance = tuple(config["variance"])
        self._mean = torch.tensor(_BGR_MEAN, device=self.device).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @classmethod
    def load(
        cls,
        weights_dir: Path,
        name: str = DetectorConfig.name,
        device: str | torch.device = "cpu",
        *,
        threshold: float = DetectorConfig.threshold,
        max_side: int = DetectorConfig.max_side,
        min_face_size: int = DetectorConfig.min_face_size,
    ) -> FaceDetector:
        """Build the network and load `<weights_dir>/facexlib/<file>` after checking its sha256.

        Nothing is downloaded. Raises WeightsNotFoundError, ChecksumMismatchError,
        StateDictMismatchError, InvalidInputError (unknown name).
        """
        if name not in DETECTORS:
            raise InvalidInputError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
        spec = DETECTORS[name]
        path = Path(weights_dir) / "facexlib" / spec.filename
        state = load_detector_state(path, spec.sha256)
        detector = cls.from_state_dict(
            state,
            name,
            device,
            threshold=threshold,
            max_side=max_side,
            min_face_size=min_face_size,
        )
        logger.info("loaded face detector %s from %s on %s", name, path, device)
        return detector

    @classmethod
    def from_config(
        cls, weights_dir: Path, config: DetectorConfig, device: str | torch.device = "cpu"
    ) -> FaceDetector:
        """`load` with the name and thresholds of `config`."""
        return cls.load(
            weights_dir,
            config.name,
            device,
            threshold=config.threshold,
            max_side=config.max_side,
            min_face_size=config.min_face_size,
        )

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        name: str,
        device: str | torch.device = "cpu",
        *,
        threshold: float = DetectorConfig.threshold,
        max_side: int = DetectorConfig.max_side,
        min_face_size: int = DetectorConfig.min_face_size,
    ) -> FaceDetector:
        """Build facexlib's RetinaFace for `name` and load `state` strictly (all keys, shapes)."""
        if name not in DETECTORS:
            raise InvalidInputError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
        with warnings.catch_warnings():
            # facexlib builds its ResNet-50 with torchvision's deprecated `pretrained=False`.
            warnings.simplefilter("ignore", UserWarning)
            network = RetinaFace(network_name=DETECTORS[name].network, device=torch.device("cpu"))
        check_state_dict(f"face detector {name}", network, state)
        network.load_state_dict(state, strict=True)
        return cls(
            network.to(device),
            name,
            threshold=threshold,
            max_side=max_side,
            min_face_size=min_face_size,
        )

    def describe(self) -> dict[str, object]:
        spec = DETECTORS[self.name]
        return {
            "name": self.name,
            "file": f"facexlib/{spec.filename}",
            "sha256": spec.sha256,
            "device": str(self.device),
            "threshold": self.threshold,
            "max_side": self.max_side,
            "min_face_size": self.min_face_size,
        }

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """Faces in an (H, W, 3) uint8 RGB image, highest score first, in its pixel coordinates.

        Runs on a resized copy: downscaled so its longer side is at most `max_side`, or upscaled
        so its shorter side is at least `min_side` (within `max_side`); boxes and landmarks
        are mapped back to the image.
        """
        check_rgb(rgb)
        height, width = rgb.shape[:2]
        small = _detection_copy(rgb, self.max_side, self.min_side)
        loc, conf, landms = self._forward(small)
        priors = _priors(small.shape[0], small.shape[1], self._steps, self._min_sizes)
        if priors.shape[0] != loc.shape[0]:
            raise DetectorError(f"{priors.shape[0]} priors for {loc.shape[0]} network outputs")
        keep = torch.nonzero(conf[:, 1] > self.threshold).squeeze(1)
        priors = priors.to(loc.device)[keep]
        boxes = decode(loc[keep], priors, self._variance)  # (K, 4), fractions of the image
        points = decode_landm(landms[keep], priors, self._variance)  # (K, 10)
        boxes = boxes.cpu().double() * torch.tensor([width, height] * 2, dtype=torch.float64)
        points = points.cpu().double() * torch.tensor([width, height] * 5, dtype=torch.float64)
        return self._select(boxes, points, conf[keep, 1].cpu().double())

    def _forward(self, small: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Network outputs for one image: loc (N, 4), softmax scores (N, 2), landmarks (N, 10)."""
        bgr = np.ascontiguousarray(small[..., ::-1]).transpose(2, 0, 1)  # (3, h, w), BGR here only
        x = torch.from_numpy(bgr).to(self.device, torch.float32).unsqueeze(0) - self._mean
        with torch.inference_mode():
            loc, conf, landms = self.network(x)
        return loc[0].float(), conf[0].float(), landms[0].float()

    def _select(
        self, boxes: torch.Tensor, points: torch.Tensor, scores: torch.Tensor
    ) -> list[DetectedFace]:
        sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        big = sides >= self.min_face_size
        boxes, points, scores = boxes[big], points[big], scores[big]
        order = torchvision.ops.nms(boxes.float(), scores.float(), _NMS_IOU)  # score-descending
        return [
            DetectedFace(
                box=tuple(float(v) for v in boxes[i]),  # type: ignore[arg-type]
                landmarks=tuple(
                    (float(points[i, 2 * k]), float(points[i, 2 * k + 1])) for k in range(5)
                ),
                score=float(scores[i]),
            )
            for i in order.tolist()
        ]


def load_detector_state(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """Read a RetinaFace .pth: sha256 checked first, tensors only, `module.` prefix stripped."""
    if not path.is_file():
        raise WeightsNotFoundError(f"face detector weights not found: {path}")
    digest = sha256_file(path)
    if digest != sha256:
        raise ChecksumMismatchError(f"{path}: sha256 {digest}, expected {sha256}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        # weights_only refuses anything but tensors and plain containers.
        raise WeightsError(f"cannot read {path} as a tensors-only state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    # The released files were saved from nn.DataParallel.
    return {k.removeprefix("module."): v for k, v in state.items()}


def _detection_copy(rgb: np.ndarray, max_side: int, min_side: int) -> np.ndarray:
    """The image at the scale the detector sees it (the image itself when that is 1)."""
    height, width = rgb.shape[:2]
    scale = min(max(min_side / min(height, width), 1.0), max_side / max(height, width))
    if abs(scale - 1.0) < 1e-3:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    return cv2.resize(rgb, size, interpolation=interpolation)


@functools.lru_cache(maxsize=32)
def _priors(
    height: int, width: int, steps: tuple[int, ...], min_sizes: tuple[tuple[int, ...], ...]
) -> torch.Tensor:
    """RetinaFace anchors (N, 4) as (cx, cy, w, h) fractions of the image, in the network's order.

    Per level: rows, then columns, then anchor sizes; the feature map of stride s is
    ceil(side / s). Cached per input size; the returned tensor is shared, never modified.
    """
    levels = []
    for step, sizes in zip(steps, min_sizes, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # (rows, cols)
        anchors = [
            torch.stack(
                [cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], -1
            )
            for s in sizes
        ]
        levels.append(torch.stack(anchors, dim=2).reshape(-1, 4))  # (rows * cols * A, 4)
    return torch.cat(levels).float()


def select_faces(
    faces: Sequence[DetectedFace],
    width: int,
    height: int,
    *,
    only_center_face: bool = False,
    max_faces: int | None = None,
    indices: Sequence[int] | None = None,
    min_face_size: int | None = None,
) -> list[DetectedFace]:
    """The faces to restore, largest first (also the paste order: small faces end on top).

    In this order: faces whose box's shorter side is under `min_face_size` pixels are dropped;
    `indices` keeps those positions of the remaining largest-first list (the order results list
    faces in; indices past the end are ignored); `only_center_face` keeps the face whose box
    centre is nearest the image centre; `max_faces` keeps the largest ones.
    """
    chosen = sorted(faces, key=lambda f: f.area, reverse=True)
    if min_face_size is not None:
        chosen = [
            f for f in chosen if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_face_size
        ]
    if indices is not None:
        wanted = set(indices)
        chosen = [f for i, f in enumerate(chosen) if i in wanted]
    if only_center_face and chosen:
        cx, cy = width / 2, height / 2
        chosen = [min(chosen, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)]
    if max_faces is not None:
        chosen = chosen[:max_faces]
    return chosen
