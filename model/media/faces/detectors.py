"""The face detectors the service knows: names, files and checksums (no torch: the command line
checks that a detector's file is present before it imports anything heavy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from model.config import DetectorName


@dataclass(frozen=True)
class DetectorSpec:
    """One RetinaFace variant: facexlib's network name, its file name, and the file's sha256."""

    network: str
    filename: str
    sha256: str


# The sha256 values are fixed here, independent of any manifest: a lookalike mobile0.25 file
# with the same name and size circulates; it loads and returns bogus boxes.
DETECTORS: Final[dict[DetectorName, DetectorSpec]] = {
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
