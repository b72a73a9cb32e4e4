"""Stage 1: the VRE's tokenizer. VQ autoencoders for HQ and LQ faces, then their association.

Phases (by global step, see `Stage1Config`):

1. `hq`: the HQ autoencoder reconstructs ground-truth faces.
2. `lq`: the LQ autoencoder reconstructs the degraded faces.
3. `assoc`: both keep reconstructing, and the association loss pulls the LQ encoder's features
   of a degraded face towards the HQ encoder's features of its original, position by position.

Each autoencoder's loss: L1 + perceptual (VGG19) + VQ (beta 0.25) + adaptive patch-GAN (hinge,
0.8 x the gradient-norm ratio at the last decoder layer, from `gan_start` of its own steps).

Export (`<output_dir>/export/`): `vre_tokenizer.safetensors` (LQ encoder, quant_conv, codebook
under the names `VisualRepresentationEmbedder` uses; stage 2 and `osdface` load it strictly),
both full autoencoders, and `vre_config.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from model.image_processor import denormalize, normalize
from train.common import build_datasets, frozen
from train.config import Stage1Config, to_dict
from train.discriminator import PatchDiscriminator, patch_d_loss
from train.engine import Engine
from train.losses import (
    VGGPerceptual,
    adaptive_gan_weight,
    association_loss,
    hinge_g_loss,
    psnr,
)
from train.vq import VQAutoencoder, VQOutput

logger = logging.getLogger(__name__)

Phase = Literal["hq", "lq", "assoc"]
TOKENIZER_FILE = "vre_tokenizer.safetensors"


class Stage1Task:
    """Two VQ autoencoders and their patch discriminators."""

    def __init__(self, config: Stage1Config, engine: Engine, perceptual: VGGPerceptual) -> None:
        self.config, self.engine = config, engine
        beta = config.vq_beta
        nets = [VQAutoencoder(config.vre, beta), VQAutoencoder(config.vre, beta)]
        discs = [PatchDiscriminator(config.disc_channels, config.disc_layers) for _ in range(2)]
        if engine.config.gradient_checkpointing:
            for ae in nets:
                ae.enable_gradient_checkpointing()
        opts = [self._adam(m) for m in (*nets, *discs)]
        prepared = engine.prepare(*nets, *discs, *opts)
        self.ae = {"hq": prepared[0], "lq": prepared[1]}
        self.disc = {"hq": prepared[2], "lq": prepared[3]}
        self.opt = {"hq": prepared[4], "lq": prepared[5]}
        self.disc_opt = {"hq": prepared[6], "lq": prepared[7]}
        self.perceptual = perceptual.to(engine.device)

    def _adam(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.config.lr, betas=self.config.betas)

    # --- schedule ------------------------------------------------------------------------

    def phase(self, step: int) -> Phase:
        c = self.config
        if step < c.hq_steps:
            return "hq"
        return "lq" if step < c.hq_steps + c.lq_steps else "assoc"

    def own_steps(self, which: str, step: int) -> int:
        """How many steps autoencoder `which` has trained before this one (for gan_start)."""
        c = self.config
        in_assoc = max(0, step - c.hq_steps - c.lq_steps)
        if which == "hq":
            return min(step, c.hq_steps) + in_assoc
        return min(max(0, step - c.hq_steps), c.lq_steps) + in_assoc

    # --- one step ------------------------------------------------------------------------

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> dict[str, float]:
        phase = self.phase(step)
        which = ["hq", "lq"] if phase == "assoc" else [phase]
        targets = {"hq": normalize(batch["gt"]), "lq": normalize(batch["lq"])}  # [-1, 1]
        logs: dict[str, float] = {"phase": ["hq", "lq", "assoc"].index(phase)}
        outputs: dict[str, VQOutput] = {}
        with self.engine.autocast():
            total = torch.zeros((), device=self.engine.device)
            for w in which:
                outputs[w] = self.ae[w](targets[w])
                loss, parts = self.autoencoder_loss(w, outputs[w], targets[w], step)
                total = total + loss
                logs.update({f"{w}/{k}": v for k, v in parts.items()})
            if phase == "assoc" and self.config.assoc_weight > 0:
                assoc = association_loss(
                    outputs["hq"].features, outputs["lq"].features, self.config.assoc_temperature
                )
                total = total + self.config.assoc_weight * assoc
                logs["assoc"] = float(assoc.detach())
        for w in which:
            self.opt[w].zero_grad(set_to_none=True)
        self.engine.backward(total)
        for w in which:
            self.engine.clip(list(self.ae[w].parameters()))
            self.opt[w].step()
        for w in which:
            if self._gan_on(w, step):
                logs[f"{w}/d_loss"] = self.discriminator_step(w, targets[w], outputs[w].recon)
        logs["loss"] = float(total.detach())
        return logs

    def _gan_on(self, which: str, step: int) -> bool:
        return self.config.gan_weight > 0 and self.own_steps(which, step) >= self.config.gan_start

    def autoencoder_loss(
        self, which: str, out: VQOutput, target: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        l1 = F.l1_loss(out.recon, target)
        rec = c.l1_weight * l1
        if c.perceptual_weight > 0:
            rec = rec + c.perceptual_weight * self.perceptual(out.recon, target)
        loss = rec + out.vq_loss
        parts = {
            "l1": float(l1.detach()),
            "rec": float(rec.detach()),
            "vq": float(out.vq_loss.detach()),
        }
        if self._gan_on(which, step):
            with frozen(self.engine.unwrap(self.disc[which])) as disc:
                g_loss = hinge_g_loss(disc(out.recon))
            last = self.engine.unwrap_as(self.ae[which], VQAutoencoder).last_layer()
            weight = adaptive_gan_weight(rec, g_loss, last, c.gan_weight)
            loss = loss + weight * g_loss
            parts.update(g_loss=float(g_loss.detach()), gan_weight=float(weight))
        return loss, parts

    def discriminator_step(self, which: str, real: torch.Tensor, fake: torch.Tensor) -> float:
        with self.engine.autocast():
            d_loss = patch_d_loss(self.disc[which], real, fake)
        self.disc_opt[which].zero_grad(set_to_none=True)
        self.engine.backward(d_loss)
        self.engine.clip(list(self.disc[which].parameters()))
        self.disc_opt[which].step()
        return float(d_loss.detach())

    # --- engine hooks --------------------------------------------------------------------

    def trainable(self) -> dict[str, nn.Parameter]:
        params = {}
        for w in ("hq", "lq"):
            model = self.engine.unwrap(self.ae[w])
            params.update({f"{w}.{n}": p for n, p in model.named_parameters() if p.requires_grad})
        return params

    def validate(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Rows of [lq, LQ reconstruction, gt, HQ reconstruction]; PSNR and codebook use."""
        metrics, shown = {}, [batch["lq"]]
        for w, key in (("lq", "lq"), ("hq", "gt")):
            model = self.engine.unwrap(self.ae[w]).eval()
            with self.engine.autocast():
                out = model(normalize(batch[key]))
            model.train()
            recon = denormalize(out.recon.float())
            metrics[f"psnr_{w}"] = float(psnr(recon, batch[key]).mean())
            metrics[f"codes_used_{w}"] = float(
                out.indices.unique().numel() / self.config.vre.codebook_size
            )
            shown += [recon] if w == "lq" else [batch["gt"], recon]
        rows = torch.cat(shown, dim=-1)  # (N, 3, H, 4W)
        return rows, metrics

    def export(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        lq = self.engine.unwrap_as(self.ae["lq"], VQAutoencoder)
        save_file(lq.tokenizer_state_dict(), str(directory / TOKENIZER_FILE))
        for w in ("hq", "lq"):
            model = self.engine.unwrap(self.ae[w])
            state = {
                k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
            }
            save_file(state, str(directory / f"{w}_autoencoder.safetensors"))
        (directory / "vre_config.json").write_text(
            json.dumps(to_dict(self.config)["vre"], indent=2)
        )
        return directory / TOKENIZER_FILE


def run_stage1(config: Stage1Config, *, perceptual: VGGPerceptual | None = None) -> Path | None:
    """Train stage 1 as configured; returns the exported tokenizer (main process)."""
    engine = Engine(config.engine, "stage1", to_dict(config))
    if perceptual is None:
        if config.weights_dir is None:
            raise ValueError("weights_dir is required: it holds train/vgg19-dcbb9e9d.pth")
        perceptual = VGGPerceptual.from_weights(config.weights_dir)
    perceptual = perceptual.to(dtype=engine.weight_dtype)
    task = Stage1Task(config, engine, perceptual)
    train, val = build_datasets(config, config.engine.seed)
    try:
        return engine.fit(task, train, val, config.data.num_workers)
    finally:
        engine.close()
