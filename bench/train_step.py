"""Time and peak memory of full-size OSDFace stage-2 training steps (random weights).

One step = the generator update (MSE + identity + EA-DISTS + GAN through the latent
discriminator) and one discriminator update, SD2.1-base shapes at 512 px, batch 2, bf16
autocast with fp32 LoRA, as `osdface train stage2` runs it by default.

    python -m bench.train_step --device cuda --json out.json
    python -m bench.train_step --device cpu --weights DIR   # a small existing weights folder

Without --weights, a random full-size weights folder (SD2.1-base configs from
model/configs) is written to a temporary directory first.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from model.config import OSDFaceConfig
from model.networks.vre import VisualRepresentationEmbedder
from train.config import DataConfig, EngineConfig, Stage2Config
from train.engine import Engine
from train.losses import DISTS, IdentityLoss
from train.stage2 import Stage2Task

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "model/configs/sd21-base"


def write_random_weights(root: Path, device: str) -> Path:
    """SD2.1-base-shaped UNet and VAE (bf16 on disk), the default VRE, the scheduler config."""
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
    unet.to(torch.bfloat16).save_pretrained(root / "sd21-base/unet", safe_serialization=True)
    vae.to(torch.bfloat16).save_pretrained(root / "sd21-base/vae", safe_serialization=True)
    shutil.copytree(CONFIGS / "scheduler", root / "sd21-base/scheduler")
    config = OSDFaceConfig()
    config.save(root / "osdface")
    vre = VisualRepresentationEmbedder(config.vre)
    save_file(
        {k: v.contiguous() for k, v in vre.state_dict().items()},
        str(root / "osdface/vre.safetensors"),
    )
    del unet, vae
    return root


def measure(weights: Path, out: Path, device: str, batch: int, steps: int, checkpointing: bool):
    size = OSDFaceConfig.load(weights / "osdface").image_size
    precision = "bf16" if device == "cuda" else "no"
    config = Stage2Config(
        weights_dir=weights,
        data=DataConfig(image_size=size),
        engine=EngineConfig(
            output_dir=out,
            batch_size=batch,
            mixed_precision=precision,
            gradient_checkpointing=checkpointing,
            tracker="none",
            progress=False,
        ),
    )
    config.validate()
    engine = Engine(config.engine, "bench", {})
    task = Stage2Task(config, engine, IdentityLoss.random(0), DISTS.random(0))
    g = torch.Generator().manual_seed(0)
    data = {
        k: torch.rand(batch, 3, size, size, generator=g).to(engine.device) for k in ("gt", "lq")
    }
    rng = torch.Generator().manual_seed(0)
    task.train_step(data, 0, rng)  # warm-up: allocator, kernels, optimizer state
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        logs = task.train_step(data, step, rng)
    sync()
    seconds = (time.perf_counter() - start) / steps
    trainable = sum(p.numel() for p in task.gen_params)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "image_size": size,
        "batch_size": batch,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "step_seconds": round(seconds, 4),
        "steps_timed": steps,
        "generator_trainable_params": trainable,
        "disc_trainable_params": sum(p.numel() for p in task.disc_params),
        "last_losses": {k: round(v, 4) for k, v in logs.items()},
    }
    if device == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    del task, engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", type=Path, help="existing weights folder (else random)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--both", action="store_true", help="also without gradient checkpointing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or write_random_weights(Path(tmp) / "weights", args.device)
        results = [
            measure(weights, Path(tmp) / "run", args.device, args.batch_size, args.steps, True)
        ]
        print(json.dumps(results[-1]), flush=True)
        if args.both:
            results.append(
                measure(
                    weights, Path(tmp) / "run2", args.device, args.batch_size, args.steps, False
                )
            )
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
