"""Metric names and what each needs, without importing torch (the CLI checks them first)."""

from __future__ import annotations

FULL_REFERENCE = ("lpips", "dists")  # pyiqa, compared with the HQ face
NO_REFERENCE = ("musiq", "niqe", "clipiqa", "maniqa")  # pyiqa, the restored face alone
PYIQA_METRICS = FULL_REFERENCE + NO_REFERENCE
PER_IMAGE = ("psnr", "ssim", "lpips", "dists", "deg", "lmd", "musiq", "niqe", "clipiqa", "maniqa")
SET_LEVEL = ("fid_ffhq", "fid_hq")
ALL_METRICS = PER_IMAGE + SET_LEVEL
NEEDS_HQ = {"psnr", "ssim", "deg", "lmd", "fid_hq", *FULL_REFERENCE}
