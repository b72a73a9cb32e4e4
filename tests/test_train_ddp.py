"""Two processes under torchrun (gloo, CPU): DDP keeps every trained parameter equal.

The test starts `torchrun --nproc_per_node 2` on this very file; `worker()` is what each
rank runs. Each rank sees different faces, and the averaged gradients must still leave the
LoRA, the projection and the discriminator heads identical across ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_keep_parameters_equal(tmp_path: Path):
    from tests.train_helpers import write_faces, write_train_weights

    weights = write_train_weights(tmp_path / "weights")
    faces = write_faces(tmp_path / "faces", 8, size=32)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        __file__,
        str(weights),
        str(faces),
        str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stderr[-4000:]}")
    ranks = [load_file(str(tmp_path / "out" / f"rank{r}.safetensors")) for r in (0, 1)]
    initial = load_file(str(tmp_path / "out" / "initial.safetensors"))
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    assert any("lora_" in k for k in ranks[0]) and any(k.startswith("disc.") for k in ranks[0])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(not torch.equal(ranks[0][k], initial[k]) for k in initial)  # it did train
    seen = [
        set(load_file(str(tmp_path / "out" / f"seen{r}.safetensors"))["index"].tolist())
        for r in (0, 1)
    ]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # the ranks saw different faces


def worker(weights: Path, faces: Path, out: Path) -> None:
    """One rank: two stage-2 steps with the GAN on, then dump the trained weights.

    `init="scratch"` puts LoRA layers on every default target (attention, feed-forward, ResNet
    and resampling convolutions, conv_out): DDP must find all of them used in each step."""
    from train.common import build_datasets
    from train.config import DataConfig, EngineConfig, Stage2Config
    from train.engine import Engine, trainable_state
    from train.losses import DISTS, IdentityLoss
    from train.stage2 import Stage2Task

    torch.set_num_threads(1)
    config = Stage2Config(
        weights_dir=weights,
        init="scratch",
        lora_rank=4,
        lora_alpha=4,
        warmup_steps=0,
        lr=1e-3,
        gan_weight=0.5,
        disc_head_channels=8,
        engine=EngineConfig(
            output_dir=out,
            max_steps=2,
            batch_size=1,
            mixed_precision="no",
            gradient_checkpointing=False,
            checkpoint_every=1000,
            tracker="none",
            progress=False,
        ),
        data=DataConfig(train_dir=faces, image_size=32, num_workers=0),
    )
    config.validate()
    engine = Engine(config.engine, "stage2", {})
    rank, world = engine.accelerator.process_index, engine.accelerator.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    task = Stage2Task(config, engine, IdentityLoss.random(0), DISTS.random(0))

    def state() -> dict[str, torch.Tensor]:
        gen = trainable_state(engine.unwrap(task.generator))
        disc = trainable_state(engine.unwrap(task.disc))
        return {**gen, **{f"disc.{k}": v for k, v in disc.items()}}

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state(), str(out / "initial.safetensors"))
    train, _ = build_datasets(config, config.engine.seed)
    seen: list[int] = []
    original = task.train_step

    def recording_step(batch, step, generator):
        seen.extend(batch["index"].tolist())
        return original(batch, step, generator)

    task.train_step = recording_step
    engine.fit(task, train, None, num_workers=0)
    save_file(state(), str(out / f"rank{rank}.safetensors"))
    save_file({"index": torch.tensor(seen)}, str(out / f"seen{rank}.safetensors"))
    engine.close()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
