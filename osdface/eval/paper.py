"""The OSDFace paper's scores (CVPR 2025, Tables 1 and 2), for the report's side-by-side table.

Keys are this package's metric names; a metric the paper does not report for a set is absent.
"""

from __future__ import annotations

PAPER_TABLES: dict[str, dict[str, float]] = {
    "celeba-test": {
        "lpips": 0.3365,
        "dists": 0.1773,
        "musiq": 75.64,
        "niqe": 3.884,
        "deg": 60.07,
        "lmd": 5.287,
        "fid_ffhq": 45.415,
        "fid_hq": 17.06,
    },
    "wider": {
        "clipiqa": 0.7284,
        "maniqa": 0.5229,
        "musiq": 74.601,
        "niqe": 3.774,
        "fid_ffhq": 34.648,
    },
    "lfw": {
        "clipiqa": 0.7203,
        "maniqa": 0.5493,
        "musiq": 75.354,
        "niqe": 3.871,
        "fid_ffhq": 44.629,
    },
    "webphoto": {
        "clipiqa": 0.7106,
        "maniqa": 0.5162,
        "musiq": 73.935,
        "niqe": 3.986,
        "fid_ffhq": 84.597,
    },
}

# Direction of each metric, for the report's arrows and for ranking faces.
LOWER_IS_BETTER = {"lpips", "dists", "niqe", "deg", "lmd", "fid_ffhq", "fid_hq"}
HIGHER_IS_BETTER = {"psnr", "ssim", "musiq", "clipiqa", "maniqa"}
