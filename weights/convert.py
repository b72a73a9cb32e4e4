"""`osdface weights convert` and `merge`: the released pickles to safetensors, the LoRA fused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import OSDFaceConfig
from model.errors import WeightsError
from model.networks.vre import VisualRepresentationEmbedder
from weights.layout import WeightsLayout, require
from weights.load import load_base_unet
from weights.lora import merge_lora
from weights.pickle_safe import load_checkpoint, tensors_only
from weights.stamps import Step, fingerprint
from weights.strict import check_state_dict, read_safetensors

logger = logging.getLogger(__name__)

LQ_PREFIX = "vqvae_LQ."
# Decoder-side parts of the LQ autoencoder: trained with it, unused by the tokenizer.
LQ_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def write_merged_unet(layout: WeightsLayout, config: OSDFaceConfig, *, force: bool = False) -> Path:
    """`osdface weights merge`: save base UNet + fused LoRA as one safetensors.

    Nothing is read or written when the merged UNet was made from the same inputs (`force`
    redoes it).
    """
    out = layout.merged_unet_dir
    step = Step.merge(layout)
    if not force and step.is_current():
        logger.info("merged UNet in %s is up to date; nothing written", out)
        return out
    record = fingerprint(step.inputs)
    unet = merge_lora(load_base_unet(layout), read_safetensors(layout.lora), config)
    unet.save_pretrained(out, safe_serialization=True)
    step.done(record)
    logger.info("merged UNet written to %s", out)
    return out


def vre_state_from_released(layout: WeightsLayout) -> dict[str, torch.Tensor]:
    """Tensors of the two released pickles, renamed to `VisualRepresentationEmbedder` keys."""
    ckpt = load_checkpoint(require(layout.released_vre, "OSDFace associate_2.ckpt"))
    state = tensors_only(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt)
    lq = {k[len(LQ_PREFIX) :]: v for k, v in state.items() if k.startswith(LQ_PREFIX)}
    lq = {k: v for k, v in lq.items() if not k.startswith(LQ_DECODER_PREFIXES)}
    if not lq:
        raise WeightsError(f"{layout.released_vre}: no tensors under {LQ_PREFIX!r}")
    proj = load_checkpoint(require(layout.released_projection, "embedding_change_weights.pth"))
    proj = tensors_only(proj.get("state_dict", proj) if isinstance(proj, dict) else proj)
    return {**lq, **{f"projection.{k}": v for k, v in proj.items()}}


def convert_released(layout: WeightsLayout, config: OSDFaceConfig, *, force: bool = False) -> Path:
    """`osdface weights convert`: released pickles -> checked `vre.safetensors`.

    Skipped when `vre.safetensors` was made from the same two files (`force` redoes it).
    """
    step = Step.convert(layout)
    if not force and step.is_current():
        logger.info("%s is up to date; nothing written", layout.vre)
        return layout.vre
    record = fingerprint(step.inputs)
    state = vre_state_from_released(layout)
    with torch.device("meta"):
        model = VisualRepresentationEmbedder(config.vre)
    check_state_dict("released VRE + projection", model, state)
    metadata = {"source": json.dumps({name: r["sha256"] for name, r in record.items()})}
    state = {k: v.contiguous().float() for k, v in state.items()}
    save_file(state, str(layout.vre), metadata=metadata)
    step.done(record)
    if not (layout.osdface / "config.json").is_file():
        config.save(layout.osdface)
    logger.info("wrote %s (%d tensors)", layout.vre, len(state))
    return layout.vre
