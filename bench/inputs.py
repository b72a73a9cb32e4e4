"""What the benches run on: the test assets, and a weights folder (given, or tiny random)."""

from __future__ import annotations

from pathlib import Path

from tests.assets import locate


def assets() -> Path:
    """The test assets: OSDFACE_TEST_ASSETS (default ../shared/assets), else `make assets`'s
    cache."""
    return locate()


def weights_folder(given: Path | None, tiny: bool, folder: Path) -> Path:
    """`given`, or with `tiny` the tests' tiny random weights written into `folder` (the real
    face detector from the assets). SystemExit when neither is chosen."""
    if tiny:
        from tests.tiny_weights import write_tiny_weights

        return write_tiny_weights(folder, detector_dir=assets() / "detectors")
    if given is None:
        raise SystemExit("give --weights DIR or --tiny")
    return given
