"""Face detection time against image size: prints a markdown table.

The photo (a real one from the test assets by default) is resized so its longer side takes each
of the listed sizes; every size is detected with the service's default downscale (`max_side`
1024) and, up to 2048, without it (`max_side` = the image's own side). Detection includes the
downscale, the network, decoding, thresholds and NMS: what one `FaceDetector.detect` call costs.

    python -m bench.detect --weights ./osdface-weights --detector retinaface_resnet50
    python -m bench.detect --weights <dir with facexlib/detection_mobilenet0.25_Final.pth>
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from facexlib.detection.retinaface import RetinaFace
from PIL import Image

from model.config import DetectorConfig
from model.media.faces.detect import DETECTORS, FaceDetector

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = Path(os.environ.get("OSDFACE_TEST_ASSETS", REPO.parent / "shared" / "assets"))
DEFAULT_PHOTO = DEFAULT_ASSETS / "images/gfpgan/whole_imgs/00.jpg"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", type=Path, help="weights dir holding facexlib/")
    p.add_argument(
        "--untrained",
        action="store_true",
        help="random weights, for timing only (the cost does not depend on the values)",
    )
    p.add_argument("--detector", choices=sorted(DETECTORS), default="retinaface_mobile0.25")
    p.add_argument("--device", default="cpu")
    p.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument(
        "--max-side", type=int, default=DetectorConfig.max_side, help="the detector's max_side"
    )
    p.add_argument("--full-up-to", type=int, default=2048, help="also time without downscale")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


def resized(rgb: np.ndarray, long_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = long_side / max(height, width)
    size = (round(width * scale), round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(rgb, size, interpolation=interpolation)


def time_detect(detector: FaceDetector, rgb: np.ndarray, repeats: int) -> tuple[float, int]:
    """Median seconds of `repeats` calls after one warm-up, and the faces found."""
    faces = detector.detect(rgb)
    times = []
    for _ in range(repeats):
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        detector.detect(rgb)
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(faces)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.untrained:
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained` deprecation
        network = RetinaFace(DETECTORS[args.detector].network, device=torch.device("cpu"))
        # Random class heads pass ~20% of the anchors to NMS; trained ones pass a handful.
        # Zeroed, every score is 0.5 and none passes: the network's full cost, no NMS.
        with torch.no_grad():
            for parameter in network.ClassHead.parameters():
                parameter.zero_()
        base = FaceDetector(network.to(args.device), args.detector, max_side=args.max_side)
    elif args.weights is None:
        raise SystemExit("--weights is required unless --untrained")
    else:
        base = FaceDetector.load(args.weights, args.detector, args.device, max_side=args.max_side)
    rgb = np.asarray(Image.open(args.photo).convert("RGB"))
    device = torch.cuda.get_device_name() if base.device.type == "cuda" else platform.processor()
    print(
        f"{args.detector} on {args.device} ({device or 'cpu'}, {torch.get_num_threads()} "
        f"threads), photo {args.photo.name}, median of {args.repeats}\n"
    )
    print("| image (long side) | detected at | time (ms) | faces |")
    print("|---|---|---:|---:|")
    for side in args.sizes:
        image = resized(rgb, side)
        label = f"{image.shape[1]}x{image.shape[0]}"
        runs = [args.max_side]
        if side <= args.full_up_to and side > args.max_side:
            runs.append(side)
        for max_side in runs:
            detector = FaceDetector(base.network, args.detector, max_side=max_side)
            seconds, faces = time_detect(detector, image, args.repeats)
            at = min(side, max_side)
            found = "n/a" if args.untrained else str(faces)
            print(f"| {label} | {at} | {seconds * 1000:.1f} | {found} |")


if __name__ == "__main__":
    main()
