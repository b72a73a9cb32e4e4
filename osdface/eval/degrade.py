"""Synthetic LQ faces from HQ ones with the CelebA-Test protocol's degradation.

CelebA-Test (as VQFR, DAEFR and the OSDFace paper use it) degrades each 512 HQ face once with
GFPGAN's single-pass model: Gaussian blur (41x41 kernel, isotropic or anisotropic, sigma
0.1..10), downsampling by 0.8..8, Gaussian noise sigma 0..20 (0-255 scale), JPEG quality
60..100, then resize back to 512. The steps are the training pipeline's (train/data.py); only
the ranges differ from training's two-stage model.

Face `i` (sorted by name) uses the generator `default_rng([seed, 0, i])`, so a set is remade
exactly from its seed. `degradation.json` in the output records the protocol, the seed and
what each face drew.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from model.atomic import write_atomic
from model.errors import InvalidInputError
from osdface.eval.run import FACE_SIZE, Progress, list_images, write_png
from train.config import DegradationConfig, DegradationStage
from train.data import degrade, read_rgb, sample_rng

logger = logging.getLogger(__name__)

RECORD = "degradation.json"


def celeba_test_config() -> DegradationConfig:
    first = DegradationStage(
        kernel_size=41,
        isotropic_prob=0.5,
        blur_sigma=(0.1, 10.0),
        downsample=(0.8, 8.0),
        noise_sigma=(0.0, 20.0),
        jpeg_quality=(60, 100),
    )
    second = DegradationStage(prob=0.0)
    config = DegradationConfig(first=first, second=second, resize_modes=("bilinear",))
    config.validate()
    return config


def degrade_folder(hq_dir: Path, out_dir: Path, seed: int = 0) -> list[Path]:
    """Write `<out>/<stem>.png` for every HQ face not done yet; return the files written."""
    files = list_images(hq_dir)
    if not files:
        raise InvalidInputError(f"no images in {hq_dir}")
    if out_dir.resolve() == hq_dir.resolve():
        raise InvalidInputError("the output folder must differ from the HQ folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = celeba_test_config()
    record_path = out_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record and record.get("seed") != seed:
        raise InvalidInputError(f"{out_dir} was made with seed {record.get('seed')}, not {seed}")
    record.update(
        protocol="celeba-test (GFPGAN single-pass: blur, downsample, noise, JPEG)",
        seed=seed,
        config=asdict(config),
    )
    faces = record.setdefault("faces", {})
    written = []
    with Progress(len(files), "degraded") as bar:
        for index, path in enumerate(files):
            target = out_dir / f"{path.stem}.png"
            if not target.is_file():
                hq = read_rgb(path, FACE_SIZE)  # (512, 512, 3) float32 RGB [0, 1]
                lq, drawn = degrade(hq, config, sample_rng(seed, 0, index))
                write_png((lq * 255.0).round().astype(np.uint8), target)
                drawn_json = [asdict(d) if d else None for d in drawn]
                faces[path.stem] = {"index": index, "drawn": drawn_json}
                written.append(target)
            bar.update([path.stem])
    write_atomic(record_path, (json.dumps(record, indent=2) + "\n").encode())
    return written
