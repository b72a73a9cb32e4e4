"""Faces in whole photos: detection (RetinaFace), alignment to the FFHQ template, paste-back.

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

from model.errors import (
    ChecksumMismatchError,
    DetectorError,
    InvalidInputError,
    WeightsError,
    WeightsNotFoundError,
)
from model.weights import check_state_dict, sha256_file

logger = logging.getLogger(__name__)

FACE_SIZE: Final[int] = 512

# Five points (left eye, right eye, nose tip, left and right mouth corners; "left" is the image's
# left) of an FFHQ-aligned 512x512 face, in crop pixels. This is the standard template of
# facexlib's FaceRestoreHelper and GFPGAN (their 512 template), itself derived from the FFHQ
# alignment; OSDFace was trained on FFHQ crops, so its input must be aligned to it.
FFHQ_TEMPLATE_512: Final[np.ndarray] = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

# RetinaFace expects BGR pixels in 0..255 minus the training images' per-channel mean (B, G, R).
_BGR_MEAN: Final[tuple[float, float, float]] = (104.0, 117.0, 123.0)
_NMS_IOU: Final[float] = 0.4


@dataclass(frozen=True)
class DetectorSpec:
    """One RetinaFace variant: facexlib's network name, its file name, and the file's sha256."""

    network: str
    filename: str
    sha256: str


# The sha256 values are fixed here, independent of any manifest: a lookalike mobile0.25 file
# with the same name and size circulates; it loads and returns bogus boxes.
DETECTORS: Final[dict[str, DetectorSpec]] = {
    "retinaface_resnet50": DetectorSpec(
        "resnet50",
        "detection_Resnet50_Final.pth",
        "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
    ),
    "retinaface_mobile0.25": DetectorSpec(
        "mobile0.25",
        "detection_mobilenet0.25_Final.pth",
        "2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
    ),
}


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


# --- detection -----------------------------------------------------------------------------


class FaceDetector:
    """RetinaFace with stateless pre- and post-processing; safe to call from several threads."""

    def __init__(
        self,
        network: RetinaFace,
        name: str,
        *,
        threshold: float = 0.97,
        max_side: int = 1024,
        min_face_size: int = 16,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise InvalidInputError(f"detection threshold must be in (0, 1), got {threshold}")
        if max_side < 32 or min_face_size < 1:
            raise InvalidInputError(
                f"need max_side >= 32 and min_face_size >= 1, got {max_side}, {min_face_size}"
            )
        self.network = network.eval()
        self.name = name
        self.threshold = threshold
        self.max_side = max_side
        self.min_face_size = min_face_size
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
        name: str = "retinaface_resnet50",
        device: str | torch.device = "cpu",
        *,
        threshold: float = 0.97,
        max_side: int = 1024,
        min_face_size: int = 16,
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
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        name: str,
        device: str | torch.device = "cpu",
        *,
        threshold: float = 0.97,
        max_side: int = 1024,
        min_face_size: int = 16,
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

        Runs on a copy downscaled so its longer side is at most `max_side`; boxes and landmarks
        are mapped back to the full image.
        """
        _check_rgb(rgb)
        height, width = rgb.shape[:2]
        small = _downscale(rgb, self.max_side)
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


def _check_rgb(rgb: np.ndarray) -> None:
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.dtype != np.uint8
        or rgb.ndim != 3
        or rgb.shape[2] != 3
    ):
        shape = getattr(rgb, "shape", None)
        raise InvalidInputError(f"expected an (H, W, 3) uint8 RGB array, got {shape}")


def _downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


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
) -> list[DetectedFace]:
    """The faces to restore, largest first (also the paste order: small faces end on top).

    `only_center_face` keeps the face whose box centre is nearest the image centre;
    `max_faces` keeps the largest ones.
    """
    chosen = sorted(faces, key=lambda f: f.area, reverse=True)
    if only_center_face and chosen:
        cx, cy = width / 2, height / 2
        chosen = [min(chosen, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)]
    if max_faces is not None:
        chosen = chosen[:max_faces]
    return chosen


# --- alignment -----------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama's closed form (no reflection). src, dst: (N, 2) points, N >= 2. Returns (2, 3).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    covariance = dst_c.T @ src_c / len(src)  # (2, 2)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    variance = (src_c**2).sum() / len(src)
    if variance <= 0:
        raise InvalidInputError("landmarks are all at one point")
    scale = float(np.trace(np.diag(singular) @ sign)) / variance
    translation = mean_dst - scale * rotation @ mean_src
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp the face with these (5, 2) landmarks onto the FFHQ 512 template.

    Returns the crop, (512, 512, 3) uint8 RGB, and the (2, 3) image -> crop affine. Parts of the
    crop outside the photo are filled by reflection, so a face cut by the border does not meet a
    black edge inside the model's input (those parts are never pasted back).
    """
    _check_rgb(rgb)
    affine = similarity_transform(landmarks, FFHQ_TEMPLATE_512)
    crop = cv2.warpAffine(
        rgb,
        affine,
        (FACE_SIZE, FACE_SIZE),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return crop, affine


# --- paste-back ----------------------------------------------------------------------------

# Soft mask in crop space: 1 inside, 0 in a border band, blurred in between. Because the crop is
# a fixed 512 square scaled onto the face, the feather is proportional to the face's size in the
# photo. The blur radius (4 sigma) stays inside the band, so the mask is exactly 0 on the crop's
# edge and no crop border (or beyond) ever reaches the photo.
_MASK_BAND: Final[int] = 48
_MASK_SIGMA: Final[float] = 10.0


@functools.cache
def paste_mask() -> np.ndarray:
    """(512, 512) float32 in [0, 1]: the eroded, blurred paste mask in crop coordinates."""
    mask = np.zeros((FACE_SIZE, FACE_SIZE), np.float32)
    mask[_MASK_BAND:-_MASK_BAND, _MASK_BAND:-_MASK_BAND] = 1.0  # erosion of the full crop
    radius = int(4 * _MASK_SIGMA)
    mask = cv2.GaussianBlur(mask, (2 * radius + 1, 2 * radius + 1), _MASK_SIGMA)
    mask.flags.writeable = False
    return mask


def canvas_to_crop(affine: np.ndarray, scale: int, x0: int = 0, y0: int = 0) -> np.ndarray:
    """(2, 3) map from pixels of a canvas `scale` times the photo (offset x0, y0) to the crop.

    A canvas pixel X is the photo position (X + 0.5) / scale - 0.5 (pixel centres line up, as
    in OpenCV's resize), which `affine` then takes into the crop.
    """
    s = 1.0 / scale
    to_photo = np.array(
        [[s, 0.0, (x0 + 0.5) * s - 0.5], [0.0, s, (y0 + 0.5) * s - 0.5], [0.0, 0.0, 1.0]]
    )
    return np.asarray(affine, np.float64) @ to_photo


def paste_faces(
    canvas: np.ndarray,
    faces: Sequence[np.ndarray],
    affines: Sequence[np.ndarray],
    *,
    scale: int = 1,
    strength: float = 1.0,
    feather: bool = True,
) -> np.ndarray:
    """Paste restored crops back into `canvas` through their inverse transforms.

    canvas: (H', W', 3) uint8 RGB, the photo or its `scale`-times upscaled copy (modified in
    place and returned). faces: (512, 512, 3) float32 RGB in [0, 1], pasted in order, each over
    the result of the previous ones, so overlapping faces blend into each other without seams.
    affines: the photo -> crop transforms from `align_face`. strength: blend weight of the
    restored face against what is under it (0 leaves the canvas exactly as it was).
    `feather=False` pastes the whole crop with no mask (input that was an aligned crop).
    """
    if len(faces) != len(affines):
        raise InvalidInputError(f"{len(faces)} faces for {len(affines)} transforms")
    for face, affine in zip(faces, affines, strict=True):
        _paste_one(canvas, face, affine, scale, strength, feather)
    return canvas


def _paste_one(
    canvas: np.ndarray,
    face: np.ndarray,
    affine: np.ndarray,
    scale: int,
    strength: float,
    feather: bool,
) -> None:
    roi = _footprint(affine, scale, canvas.shape[1], canvas.shape[0])
    if roi is None:
        return
    x0, y0, x1, y1 = roi
    to_crop = canvas_to_crop(affine, scale, x0, y0)
    size = (x1 - x0, y1 - y0)
    inverse = cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(
        np.asarray(face, np.float32) * 255.0,
        to_crop,
        size,
        flags=cv2.INTER_CUBIC | inverse,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if feather:
        weight = cv2.warpAffine(
            paste_mask(),
            to_crop,
            size,
            flags=cv2.INTER_LINEAR | inverse,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.0,
        )[..., None]
    else:
        weight = np.ones((size[1], size[0], 1), np.float32)
    under = canvas[y0:y1, x0:x1].astype(np.float32)
    blended = under + (strength * weight) * (warped - under)
    canvas[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _footprint(
    affine: np.ndarray, scale: int, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Canvas box (x0, y0, x1, y1), end-exclusive, covering the crop; None when off-canvas."""
    to_canvas = cv2.invertAffineTransform(canvas_to_crop(affine, scale))
    edge = FACE_SIZE - 0.5
    corners = np.array([[-0.5, -0.5, 1], [edge, -0.5, 1], [-0.5, edge, 1], [edge, edge, 1]])
    points = corners @ to_canvas.T  # (4, 2)
    x0, y0 = np.floor(points.min(0)).astype(int)
    x1, y1 = np.ceil(points.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return int(x0), int(y0), int(x1), int(y1)
