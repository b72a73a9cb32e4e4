"""`osdface train stage1` then `osdface train stage2` on a folder of faces, then `osdface restore`.

The whole path a user takes: loss networks read from `<weights>/train/` (random weights in the
real files' layouts), stage 1's tokenizer feeding stage 2, stage 2's export restoring faces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from model.networks.restorer import OSDFaceRestorer
from osdface.cli import main as osdface
from tests.train_helpers import (
    TRAIN_VRE,
    one_thread,  # noqa: F401 - autouse fixture
    restore_args,
    write_faces,
    write_train_weights,
)
from train.losses import TRAIN_WEIGHT_FILES, ArcFaceResNet18, vgg_features


def write_loss_weights(weights: Path) -> None:
    """Random loss networks in the layouts of the real files (torchvision, DISTS, GFPGAN)."""
    train = weights / "train"
    train.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in ("vgg19", "vgg16"):
        state = {f"features.{k}": v for k, v in vgg_features(name).state_dict().items()}
        torch.save(state, train / TRAIN_WEIGHT_FILES[name])
    ab = {
        "alpha": torch.randn(1, 1475, 1, 1) * 0.01 + 0.1,
        "beta": torch.randn(1, 1475, 1, 1) * 0.01 + 0.1,
    }
    torch.save(ab, train / TRAIN_WEIGHT_FILES["dists"])
    torch.save(ArcFaceResNet18().state_dict(), train / TRAIN_WEIGHT_FILES["arcface"])


def test_train_both_stages_from_the_command_line_then_restore(tmp_path: Path):
    weights = write_train_weights(tmp_path / "weights")
    write_loss_weights(weights)
    faces = write_faces(tmp_path / "faces", 6, size=32)
    engine = {
        "batch_size": 2,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "tracker": "tensorboard",
        "progress": False,
        "log_every": 1,
        "val_every": 2,
    }
    data = {"image_size": 32, "num_workers": 0, "val_images": 2}
    stage1 = {
        "vre": {k: list(v) if isinstance(v, tuple) else v for k, v in TRAIN_VRE.__dict__.items()},
        "hq_steps": 1,
        "lq_steps": 1,
        "assoc_steps": 1,
        "gan_start": 0,
        "disc_channels": 8,
        "engine": engine,
        "data": data,
    }
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(stage1))
    rc = osdface(
        [
            "train",
            "stage1",
            "--config",
            str(tmp_path / "stage1.yaml"),
            "--train-dir",
            str(faces),
            "--val-dir",
            str(faces),
            "--weights",
            str(weights),
            "--output",
            str(tmp_path / "s1"),
        ]
    )
    assert rc == 0
    tokenizer = tmp_path / "s1/export/vre_tokenizer.safetensors"
    assert tokenizer.is_file()
    assert json.loads((tmp_path / "s1/export/vre_config.json").read_text())["resolution"] == 32

    stage2 = {
        "lora_rank": 4,
        "lora_alpha": 4,
        "disc_head_channels": 8,
        "warmup_steps": 0,
        "engine": {**engine, "max_steps": 2},
        "data": data,
    }
    (tmp_path / "stage2.json").write_text(json.dumps(stage2))
    rc = osdface(
        [
            "train",
            "stage2",
            "--config",
            str(tmp_path / "stage2.json"),
            "--train-dir",
            str(faces),
            "--weights",
            str(weights),
            "--output",
            str(tmp_path / "s2"),
            "--set",
            f"vre_tokenizer={tokenizer}",
        ]
    )
    assert rc == 0
    export = tmp_path / "s2/export"
    assert list((tmp_path / "s2/logs").rglob("events.out.tfevents.*"))  # tensorboard wrote
    restorer = OSDFaceRestorer.from_pretrained(export)
    # The exported VRE carries stage 1's tokenizer.
    tok = load_file(str(tokenizer))
    vre = restorer.vre.state_dict()
    assert all(torch.equal(vre[k], tok[k]) for k in tok)

    (tmp_path / "in").mkdir()
    face = np.asarray(Image.open(sorted(faces.iterdir())[0]))
    Image.fromarray(face).save(tmp_path / "in/a.png")
    rc = osdface(restore_args(tmp_path / "in", tmp_path / "out", export))
    assert rc == 0
    assert Image.open(tmp_path / "out/a.png").size == (32, 32)
