"""Stage 2: the one-step generator. LoRA on the SD2.1-base UNet and the prompt projection train;
the VAE and the VRE's tokenizer are frozen.

The generator is the restorer's computation with gradients: the VRE's tokens (frozen) through
its projection (trained) as the prompt, the VAE latent of the LQ face (`mode`, frozen), one
UNet call at T_L, x0 by `model.networks.restorer.x0_from_eps` (float64), and the VAE decoder.

Loss = mse_weight * MSE(out, gt) + id_weight * (1 - cos ArcFace) + per_weight * EA-DISTS
+ gan_weight * softplus(-D(noised x0)); the latent discriminator alternates with it.

Export (`<output_dir>/export/`, a weights folder): `osdface/pytorch_lora_weights.safetensors`
(released peft keys `unet.<module>.lora_A.weight`), `osdface/config.json` (rank AND alpha),
`osdface/vre.safetensors` and `osdface/embedding_change_weights.pth` (the projection), and
`sd21-base` linked to the training weights' base. `osdface restore --weights <export>` and
`osdface weights merge --dir <export>` use it as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from model.config import OSDFaceConfig
from model.errors import LoraKeyError, StateDictMismatchError
from model.image_processor import denormalize, normalize
from model.networks.restorer import x0_from_eps
from model.networks.vre import VisualRepresentationEmbedder
from train.common import build_datasets, frozen
from train.config import Stage2Config, to_dict
from train.discriminator import LatentDiscriminator
from train.engine import Engine
from train.losses import DISTS, IdentityLoss, ea_dists, psnr
from train.vq import TOKENIZER_PREFIXES
from weights.convert import convert_released
from weights.layout import WeightsLayout, require
from weights.load import load_base_unet, load_scheduler, load_vae, load_vre
from weights.lora import check_lora
from weights.strict import check_state_dict, read_safetensors

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

ADAPTER = "default"


class OneStepGenerator(nn.Module):
    """LQ faces (B, 3, S, S) RGB [0, 1] -> restored (B, 3, S, S) in [-1, 1] and x0 latents.

    The restorer's steps 1-4 (`model.networks.restorer.OSDFaceRestorer.__call__`) with gradients
    through the projection, the LoRA UNet and the VAE decoder.
    """

    def __init__(
        self,
        vre: VisualRepresentationEmbedder,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        alpha_bar: float,
        timestep: int,
    ) -> None:
        super().__init__()
        self.vre, self.vae, self.unet = vre, vae, unet
        self.alpha_bar = alpha_bar
        self.scaling_factor = float(vae.config["scaling_factor"])
        self.register_buffer("timestep", torch.tensor([timestep]), persistent=False)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """[-1, 1] image -> SD latent (mode of the posterior, scaled), no gradients."""
        dtype = self.vae.dtype
        return self.vae.encode(image.to(dtype)).latent_dist.mode() * self.scaling_factor

    # Copied from model.networks.restorer.OSDFaceRestorer.__call__ (steps 1-4), with gradients
    # through the projection, the LoRA UNet and the decoder, the tokens in fp32 outside
    # autocast, and the output left in [-1, 1] for the losses. tests/test_train_stage2.py
    # checks the two agree.
    def forward(self, lq01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lq = normalize(lq01)
        # The tokenizer is frozen and runs in fp32 outside autocast: nearest-code distances
        # decide which tokens are picked and must not be rounded to bf16.
        with torch.no_grad(), torch.autocast(lq.device.type, enabled=False):
            tokens = self.vre.tokens(lq.float())  # (B, 77, 512)
        prompt = self.vre.projection(tokens)  # (B, 77, 1024), trained
        z = self.encode(lq)  # (B, 4, S/8, S/8)
        eps = self.unet(z, self.timestep, encoder_hidden_states=prompt).sample
        x0 = x0_from_eps(z, eps, self.alpha_bar)  # float64 inside, as the release
        out = self.vae.decode((x0 / self.scaling_factor).to(self.vae.dtype)).sample
        return out.clamp(-1, 1), x0


# --- building --------------------------------------------------------------------------------


def load_tokenizer(vre: VisualRepresentationEmbedder, path: Path) -> VisualRepresentationEmbedder:
    """Stage 1's exported tokenizer into `vre` strictly (all but the projection)."""
    state = read_safetensors(path)
    tokenizer = nn.Module()
    tokenizer.encoder, tokenizer.quant_conv, tokenizer.quantize = (
        vre.encoder,
        vre.quant_conv,
        vre.quantize,
    )
    check_state_dict(f"VRE tokenizer ({path})", tokenizer, state)
    tokenizer.load_state_dict(state, strict=True)
    return vre


def build_vre(
    config: Stage2Config, layout: WeightsLayout, model_config: OSDFaceConfig
) -> VisualRepresentationEmbedder:
    """The VRE: the weights folder's (converted once if needed) or stage 1's tokenizer.

    `init == "scratch"` keeps a freshly initialised projection, as the paper trains it.
    """
    vre = VisualRepresentationEmbedder(model_config.vre)
    if config.vre_tokenizer is not None:
        load_tokenizer(vre, config.vre_tokenizer)
        if config.init == "osdface":
            logger.warning("a new tokenizer: the projection starts fresh, not from the weights")
    else:
        if not layout.vre.is_file():  # training converts the pickles once; serving never does
            convert_released(layout, OSDFaceConfig.load(layout.osdface))
        loaded = load_vre(layout, model_config)
        state = loaded.state_dict()
        if config.init == "scratch":  # the projection stays freshly initialised
            state = {k: v for k, v in state.items() if k.startswith(TOKENIZER_PREFIXES)}
        missing = vre.load_state_dict(state, strict=False).missing_keys
        if any(not k.startswith("projection.") for k in missing):
            raise StateDictMismatchError("VRE tokenizer", missing=missing)
    return vre


def add_lora(unet: UNet2DConditionModel, config: Stage2Config, layout: WeightsLayout) -> None:
    """Inject trainable LoRA layers (rank, alpha from the config); init="osdface" loads the
    weights folder's LoRA into them (its modules become the targets)."""
    targets = list(config.lora_targets)
    lora = None
    if config.init == "osdface":
        lora = read_safetensors(require(layout.lora, "the LoRA to start from"))
        targets = check_lora(unet, lora, config.lora_rank)
    unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=targets,
            init_lora_weights=True,
        ),
        adapter_name=ADAPTER,
    )
    if lora is not None:
        result = set_peft_model_state_dict(
            unet, {k.removeprefix("unet."): v for k, v in lora.items()}, adapter_name=ADAPTER
        )
        # peft annotates `-> namedtuple`; it returns load_state_dict's (missing, unexpected).
        unexpected: list[str] = result.unexpected_keys  # type: ignore[attr-defined]
        if unexpected:
            raise LoraKeyError(f"LoRA keys not loaded: {unexpected[:8]}")


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The LoRA in the released key format: `unet.<module>.lora_A.weight` / `lora_B.weight`."""
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}


def _frozen_as(model: M, dtype: torch.dtype) -> M:
    """No gradients, in `dtype` (through nn.Module's methods: diffusers' `to` is wrapped with
    functools.wraps, which the type checker cannot bind to an instance)."""
    return model.requires_grad_(False).to(dtype)


class Stage2Task:
    """Generator (LoRA + projection) and latent discriminator (heads)."""

    def __init__(
        self, config: Stage2Config, engine: Engine, identity: IdentityLoss, dists: DISTS
    ) -> None:
        self.config, self.engine = config, engine
        self.layout = WeightsLayout(Path(config.weights_dir))
        base_config = OSDFaceConfig.load(self.layout.osdface)
        self.model_config = dataclasses.replace(
            base_config, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha
        )
        if config.data.image_size != self.model_config.image_size:
            raise ValueError(
                f"data.image_size {config.data.image_size} differs from the model's "
                f"image_size {self.model_config.image_size} ({self.layout.osdface}/config.json)"
            )
        self.generator, self.disc = self._build()
        self.gen_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.disc_params = [p for p in self.disc.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            self.gen_params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        disc_opt = torch.optim.AdamW(
            self.disc_params,
            lr=config.disc_lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
        )
        warmup = max(1, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup)
        )
        self.generator, self.disc, self.opt, self.disc_opt = engine.prepare(
            self.generator, self.disc, opt, disc_opt
        )
        engine.register(self.scheduler)
        # Loss networks stay fp32 (small); autocast still runs their convolutions in bf16.
        self.identity = identity.to(engine.device)
        self.dists = dists.to(engine.device)

    def _build(self) -> tuple[OneStepGenerator, LatentDiscriminator]:
        cfg, layout, engine = self.config, self.layout, self.engine
        dtype = engine.weight_dtype
        vae = _frozen_as(load_vae(layout), dtype)
        unet = _frozen_as(load_base_unet(layout), dtype)
        scheduler = load_scheduler(layout)
        disc = LatentDiscriminator(
            unet, scheduler.alphas_cumprod, cfg.disc_head_channels, cfg.disc_timesteps
        )  # copies the base UNet, before the LoRA
        add_lora(unet, cfg, layout)
        vre = build_vre(cfg, layout, self.model_config).requires_grad_(False)
        vre.projection.requires_grad_(True)
        for p in [*unet.parameters(), *vre.projection.parameters()]:
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights stay fp32 under bf16 autocast
        if engine.config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
            disc.features.gradient_checkpointing = True
        alpha_bar = float(scheduler.alphas_cumprod[self.model_config.timestep].double())
        gen = OneStepGenerator(vre, vae.eval(), unet, alpha_bar, self.model_config.timestep)
        return gen, disc

    # --- one step ------------------------------------------------------------------------

    def gan_on(self, step: int) -> bool:
        return self.config.gan_weight > 0 and step >= self.config.gan_start

    def generator_loss(
        self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Forward and loss of the generator; returns (loss, x0 latents, logs)."""
        c = self.config
        gt = normalize(batch["gt"])
        out, x0 = self.generator(batch["lq"])
        mse = F.mse_loss(out.float(), gt)
        loss = c.mse_weight * mse
        logs = {"mse": float(mse.detach())}
        if c.id_weight > 0:
            identity = self.identity(out, gt)
            loss = loss + c.id_weight * identity
            logs["id"] = float(identity.detach())
        if c.per_weight > 0:
            per = ea_dists(self.dists, denormalize(out, clamp=False), batch["gt"])
            loss = loss + c.per_weight * per
            logs["ea_dists"] = float(per.detach())
        if self.gan_on(step):
            # Through the frozen features WITH gradients, so the GAN term reaches the LoRA.
            with frozen(self.engine.unwrap(self.disc)) as disc:
                gan = disc(x0, generator)
            loss = loss + c.gan_weight * gan
            logs["g_gan"] = float(gan.detach())
        logs["loss"] = float(loss.detach())
        return loss, x0, logs

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> dict[str, float]:
        with self.engine.autocast():
            loss, x0, logs = self.generator_loss(batch, step, generator)
        self.opt.zero_grad(set_to_none=True)
        self.engine.backward(loss)
        self.engine.clip(self.gen_params)
        self.opt.step()
        self.scheduler.step()
        logs["lr"] = float(self.scheduler.get_last_lr()[0])
        if self.gan_on(step) and step % self.config.disc_every == 0:
            logs["d_loss"] = self.discriminator_step(batch, x0, generator)
        return logs

    def discriminator_step(
        self, batch: dict[str, torch.Tensor], fake: torch.Tensor, generator: torch.Generator
    ) -> float:
        """One update of the heads on real (gt) and fake (detached x0) latents."""
        gen = self.engine.unwrap_as(self.generator, OneStepGenerator)
        real = gen.encode(normalize(batch["gt"]))
        with self.engine.autocast():
            d_loss = self.disc(fake, generator, real=real)  # through DDP; fake detached inside
        self.disc_opt.zero_grad(set_to_none=True)
        self.engine.backward(d_loss)
        self.engine.clip(self.disc_params)
        self.disc_opt.step()
        return float(d_loss.detach())

    # --- engine hooks --------------------------------------------------------------------

    def trainable(self) -> dict[str, nn.Parameter]:
        gen = self.engine.unwrap(self.generator)
        return {n: p for n, p in gen.named_parameters() if p.requires_grad}

    def validate(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Rows of [lq, output, gt] in [0, 1]; PSNR of the output against gt."""
        gen = self.engine.unwrap(self.generator)
        with self.engine.autocast():
            out, _ = gen(batch["lq"])
        out01 = denormalize(out.float())
        metrics = {
            "psnr": float(psnr(out01, batch["gt"]).mean()),
            "psnr_lq": float(psnr(batch["lq"], batch["gt"]).mean()),
        }
        return torch.cat([batch["lq"], out01, batch["gt"]], dim=-1), metrics

    def export(self, directory: Path) -> Path:
        return export_weights(
            directory,
            self.engine.unwrap_as(self.generator, OneStepGenerator),
            self.model_config,
            self.layout,
        )


def export_weights(
    directory: Path, gen: OneStepGenerator, model_config: OSDFaceConfig, base: WeightsLayout
) -> Path:
    """Write a weights folder the restorer loads as it is (layout in `weights.load`)."""
    out = WeightsLayout(directory)
    out.osdface.mkdir(parents=True, exist_ok=True)
    if out.merged_unet_dir.exists():  # a stale merge would shadow the new LoRA
        shutil.rmtree(out.merged_unet_dir)
    lora = lora_state_dict(gen.unet)
    save_file(lora, str(out.lora))
    vre_state = {k: v.detach().float().cpu().contiguous() for k, v in gen.vre.state_dict().items()}
    save_file(vre_state, str(out.vre))
    projection = {
        k.removeprefix("projection."): v
        for k, v in vre_state.items()
        if k.startswith("projection.")
    }
    torch.save(projection, out.released_projection)
    model_config.save(out.osdface)
    for name in ("sd21-base", "facexlib"):
        _link(base.root / name, out.root / name)
    logger.info(
        "exported %d LoRA tensors (rank %d, alpha %d) to %s",
        len(lora),
        model_config.lora_rank,
        model_config.lora_alpha,
        out.root,
    )
    return out.root


def _link(source: Path, target: Path) -> None:
    """Link (or copy, where links are not allowed) a folder of the training weights."""
    if not source.exists() or target.resolve() == source.resolve():
        return
    if target.is_symlink() or target.exists():
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
    try:
        os.symlink(source.resolve(), target, target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)


def run_stage2(
    config: Stage2Config, *, identity: IdentityLoss | None = None, dists: DISTS | None = None
) -> Path | None:
    """Train stage 2 as configured; returns the exported weights folder (main process)."""
    engine = Engine(config.engine, "stage2", to_dict(config))
    identity = identity or IdentityLoss.from_weights(Path(config.weights_dir))
    dists = dists or DISTS.from_weights(Path(config.weights_dir))
    task = Stage2Task(config, engine, identity, dists)
    train, val = build_datasets(config, config.engine.seed)
    try:
        return engine.fit(task, train, val, config.data.num_workers)
    finally:
        engine.close()
