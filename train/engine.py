"""The training loop both stages share, on accelerate.

What it does: one process per GPU (DDP through `accelerate launch` or `torchrun`), bf16
autocast with fp32 trainable weights, checkpoints with `save_state` (trainable weights,
optimizers, schedulers, RNG, EMA, step = data position) keeping the last K, resume, optional
EMA of the trainable weights, tensorboard scalars and validation images, PSNR on held-out faces
every N steps, a progress bar on the main process, seeds per rank.

A stage is a `Task`: it builds its models, prepares them with `engine.prepare` and implements
one training step, a validation pass and the export. Checkpoints hold only what trains (the
frozen UNet, VAE and VRE are rebuilt from the weights folder), so a stage-2 checkpoint is tens
of MB, not GB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from train.config import EngineConfig
from train.data import FaceDataset, train_loader

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


class Task(Protocol):
    """A training stage, as the engine drives it."""

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> dict[str, float]: ...

    def trainable(self) -> dict[str, nn.Parameter]:
        """Named trainable parameters (unwrapped), for EMA."""
        ...

    def validate(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Images (N, 3, H, W) in [0, 1] to show (rows of lq | output | gt) and metrics."""
        ...

    def export(self, directory: Path) -> Path: ...


class TrainState:
    """The step (which is the data position) and the stage's own random generator.

    The generator draws every random number a step uses (timesteps, noise), on the CPU, so a
    resumed run draws exactly what the uninterrupted one would.
    """

    def __init__(self, seed: int) -> None:
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


class EMA:
    """Exponential moving average of named parameters, kept in fp32."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA checkpoint names other parameters than this run trains")
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, params: dict[str, nn.Parameter]) -> Iterator[None]:
        """Swap the averaged weights in for the duration (export, validation)."""
        backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])


class Engine:
    """Owns the Accelerator, checkpoints, logging and the loop."""

    def __init__(self, config: EngineConfig, name: str, run_config: dict[str, Any]) -> None:
        self.config = config
        self.name = name
        self.output_dir = Path(config.output_dir)
        log_with = "tensorboard" if config.tracker == "tensorboard" else None
        self.accelerator = Accelerator(
            # accelerate only forms a CPU process group (gloo) when told it runs on the CPU.
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        # The same seed on every rank while models are built (DDP also broadcasts rank 0's).
        set_seed(config.seed)
        self.state = TrainState(config.seed + 1_000_003 * self.accelerator.process_index)
        self.ema: EMA | None = None
        self._custom: list[Any] = []
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / f"{name}-config.json").write_text(json.dumps(run_config, indent=2))
        if log_with:
            self.accelerator.init_trackers(name, config=_flat_scalars(run_config))
        self.accelerator.register_save_state_pre_hook(self._save_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)

    # --- setup ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype frozen networks are kept in (bf16 under bf16 mixed precision)."""
        return torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float32

    def prepare(self, *objects: Any) -> Any:
        return self.accelerator.prepare(*objects)

    def register(self, obj: Any) -> None:
        """Something else with state_dict/load_state_dict to checkpoint (an LR scheduler)."""
        self._custom.append(obj)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def unwrap_as(self, model: nn.Module, cls: type[M]) -> M:
        """`unwrap` for a model known to be a `cls` inside its wrappers (checked)."""
        inner = self.unwrap(model)
        if not isinstance(inner, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(inner).__name__}")
        return inner

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with self.accelerator.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, parameters: list[nn.Parameter]) -> float | None:
        if self.config.grad_clip <= 0:
            return None
        return float(self.accelerator.clip_grad_norm_(parameters, self.config.grad_clip))

    # --- checkpoints -----------------------------------------------------------------------

    def _save_trainable(self, models: list[nn.Module], weights: list[dict], out: str) -> None:
        """Save only what trains (and buffers), one safetensors per prepared model."""
        if self.accelerator.is_main_process:
            for i, model in enumerate(models):
                save_file(
                    trainable_state(self.unwrap(model)),
                    str(Path(out) / f"trainable_{i}.safetensors"),
                )
        weights.clear()  # nothing else: the frozen parts come from the weights folder

    def _load_trainable(self, models: list[nn.Module], directory: str) -> None:
        for i, model in enumerate(models):
            state = load_file(str(Path(directory) / f"trainable_{i}.safetensors"))
            load_trainable_state(self.unwrap(model), state)
        models.clear()

    def checkpoints(self) -> list[Path]:
        return self.checkpoints_in(self.output_dir)

    @staticmethod
    def checkpoints_in(output_dir: Path) -> list[Path]:
        """The checkpoint folders of a run, oldest first."""
        root = Path(output_dir) / CHECKPOINT_DIR
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self) -> Path:
        path = self.output_dir / CHECKPOINT_DIR / f"step-{self.state.step:08d}"
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(path))
        # Per rank: accelerate writes registered objects from the main process only.
        torch.save(
            self.state.state_dict(), path / f"train_state_{self.accelerator.process_index}.pt"
        )
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for old in self.checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        logger.info("checkpoint %s", path)
        return path

    def resume(self) -> None:
        choice = self.config.resume
        if not choice:
            return
        if choice == "latest":
            found = self.checkpoints()
            if not found:
                logger.info("no checkpoint in %s: starting fresh", self.output_dir)
                return
            path = found[-1]
        else:
            path = Path(choice)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        self.accelerator.load_state(str(path))
        state_file = path / f"train_state_{self.accelerator.process_index}.pt"
        self.state.load_state_dict(torch.load(state_file, weights_only=True))
        logger.info("resumed from %s at step %d", path, self.state.step)

    # --- the loop ----------------------------------------------------------------------------

    def fit(
        self, task: Task, train: FaceDataset, val: dict[str, torch.Tensor] | None, num_workers: int
    ) -> Path | None:
        """Train to `max_steps` (resuming if asked), then export; returns the export folder."""
        cfg, acc = self.config, self.accelerator
        if cfg.ema_decay > 0:
            self.ema = EMA(task.trainable(), cfg.ema_decay)
            self._custom.append(self.ema)
        for obj in self._custom:
            acc.register_for_checkpointing(obj)
        self.resume()
        if self.state.step == 0:
            # Ranks must differ from here on (noise, timesteps), reproducibly.
            set_seed(cfg.seed, device_specific=True)
        loader = train_loader(
            train,
            cfg.batch_size,
            seed=cfg.seed,
            rank=acc.process_index,
            world=acc.num_processes,
            start=self.state.step,
            num_workers=num_workers,
        )
        batches = iter(loader)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.state.step,
            desc=self.name,
            unit="step",
            disable=not (cfg.progress and acc.is_local_main_process),
            dynamic_ncols=True,
        )
        end = cfg.max_steps
        if cfg.stop_after_steps > 0:  # a time-limited job: checkpoint and stop early
            end = min(end, self.state.step + cfg.stop_after_steps)
        while self.state.step < end:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            logs = task.train_step(batch, self.state.step, self.state.generator)
            self.state.step += 1
            if self.ema is not None:
                self.ema.update(task.trainable())
            self._after_step(task, logs, val, bar)
        bar.close()
        if not self.checkpoints() or self.checkpoints()[-1].name != f"step-{self.state.step:08d}":
            self.save()
        if self.state.step < cfg.max_steps:
            logger.info(
                "stopped at step %d of %d; resume with engine.resume=latest",
                self.state.step,
                cfg.max_steps,
            )
            return None
        return self.export(task)

    def _after_step(
        self, task: Task, logs: dict[str, float], val: dict[str, torch.Tensor] | None, bar: tqdm
    ) -> None:
        step, cfg = self.state.step, self.config
        bar.update(1)
        if step % cfg.log_every == 0:
            self.accelerator.log(logs, step=step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(logs.items())[:4]})
        if val is not None and step % cfg.val_every == 0:
            self.validate(task, val)
        if step % cfg.checkpoint_every == 0:
            self.save()

    def validate(self, task: Task, val: dict[str, torch.Tensor]) -> dict[str, float]:
        """Run the task's validation on the main process; log metrics, images and a PNG."""
        metrics: dict[str, float] = {}
        if self.accelerator.is_main_process:
            batch = {k: v.to(self.device) for k, v in val.items()}
            with self._ema_weights(task), torch.no_grad():
                images, metrics = task.validate(batch)
            self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=self.state.step)
            self._write_images(images)
            logger.info(
                "step %d validation: %s",
                self.state.step,
                ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
            )
        self.accelerator.wait_for_everyone()
        return metrics

    def _write_images(self, images: torch.Tensor) -> None:
        folder = self.output_dir / "val"
        folder.mkdir(parents=True, exist_ok=True)
        grid = images.clamp(0, 1).float().cpu()
        if self.config.tracker == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("val/images", grid, self.state.step)
        rows = torch.cat(list(grid), dim=-2)  # (3, N*H, W): one face per row
        pixels = (rows.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"step-{self.state.step:08d}.png")

    @contextlib.contextmanager
    def _ema_weights(self, task: Task) -> Iterator[None]:
        if self.ema is None:
            yield
        else:
            with self.ema.applied(task.trainable()):
                yield

    def export(self, task: Task) -> Path | None:
        """The task's export (EMA weights if on) into <output_dir>/export, main process only."""
        target = None
        if self.accelerator.is_main_process:
            with self._ema_weights(task):
                target = task.export(self.output_dir / "export")
            logger.info("exported %s", target)
        self.accelerator.wait_for_everyone()
        return target

    def close(self) -> None:
        self.accelerator.end_training()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad, and persistent buffers, as contiguous CPU tensors."""
    state: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    persistent = model.state_dict(keep_vars=True)
    state.update({n: b for n, b in model.named_buffers() if n in persistent})
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = trainable_state(model)
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"checkpoint does not fit the model: missing {missing[:5]}, extra {extra[:5]}"
        )
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in state.items():
            current[name].copy_(tensor)


def _flat_scalars(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar} (tensorboard's hparams take scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
