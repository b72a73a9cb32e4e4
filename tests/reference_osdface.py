"""An independent OSDFace reference, written plainly from the facts sheet for the parity tests.

The parts, written without `model/` or `weights/`: a functional VQ encoder over the raw
checkpoint tensors, the projection as explicit conv1d calls, the LoRA added by hand (W + B @ A)
to a fresh UNet, ᾱ computed from the scheduler's formula. They run in the authors'-style
per-image inference of bench/baseline.py (the selection loop, the x0 formula in float64), the
one reference the benchmarks time as their baseline.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from bench.baseline import AuthorsStyleBaseline, select_codes_loop, tokens_from_codes

# --- VRE, functional -----------------------------------------------------------------------


def _gn(x, s, p, groups):
    return F.group_norm(x, groups, s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-6)


def _conv(x, s, p, **kw):
    return F.conv2d(x, s[f"{p}.weight"], s[f"{p}.bias"], **kw)


def _resblock(x, s, p, groups):
    h = _conv(F.silu(_gn(x, s, f"{p}.norm1", groups)), s, f"{p}.conv1", padding=1)
    h = _conv(F.silu(_gn(h, s, f"{p}.norm2", groups)), s, f"{p}.conv2", padding=1)
    if f"{p}.nin_shortcut.weight" in s:
        x = _conv(x, s, f"{p}.nin_shortcut")
    return x + h


def _attn(x, s, p, groups):
    b, c, hh, ww = x.shape
    h = _gn(x, s, f"{p}.norm1", groups)
    q = _conv(h, s, f"{p}.q").reshape(b, c, -1).permute(0, 2, 1)  # (B, HW, C)
    k = _conv(h, s, f"{p}.k").reshape(b, c, -1)  # (B, C, HW)
    v = _conv(h, s, f"{p}.v").reshape(b, c, -1)
    w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (B, HWq, HWk)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(out, s, f"{p}.proj_out")


def vq_encoder(x, s, cfg) -> torch.Tensor:
    """s: checkpoint tensors with the `vqvae_LQ.` prefix stripped."""
    g = cfg["norm_groups"]
    h = _conv(x, s, "encoder.conv_in", padding=1)
    levels = len(cfg["ch_mult"])
    for level in range(levels):
        for i in range(cfg["num_res_blocks"]):
            h = _resblock(h, s, f"encoder.down.{level}.block.{i}", g)
            if f"encoder.down.{level}.attn.{i}.q.weight" in s:
                h = _attn(h, s, f"encoder.down.{level}.attn.{i}", g)
        if level != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), s, f"encoder.down.{level}.downsample.conv", stride=2)
    h = _resblock(h, s, "encoder.mid.block_1", g)
    h = _attn(h, s, "encoder.mid.attn_1", g)
    h = _resblock(h, s, "encoder.mid.block_2", g)
    h = _conv(F.silu(_gn(h, s, "encoder.norm_out", g)), s, "encoder.conv_out", padding=1)
    return _conv(h, s, "quant_conv")


def prompt_by_hand(lq: torch.Tensor, vre_state: dict, proj_state: dict, cfg: dict) -> torch.Tensor:
    """lq: (1, 3, H, W) in [-1, 1] -> (1, num_tokens, prompt_dim); the authors' selection loop."""
    h = vq_encoder((lq - 0.5) / 0.5, vre_state, cfg)  # double normalisation, as released
    z = h[0].reshape(h.shape[1], -1).t()  # (N, C)
    codebook, n = vre_state["quantize.embedding.weight"], cfg["num_tokens"]
    tokens = tokens_from_codes(select_codes_loop(z, codebook, n), codebook, n)
    x = tokens.t().unsqueeze(0)  # (1, C, T)
    x = F.silu(F.conv1d(x, proj_state["conv1.weight"], proj_state["conv1.bias"]))
    x = F.silu(F.conv1d(x, proj_state["conv2.weight"], proj_state["conv2.bias"]))
    return x.transpose(1, 2)  # (1, T, prompt_dim)


# --- diffusion part --------------------------------------------------------------------------


def alpha_bar_by_hand(scheduler_config: Path, t: int) -> float:
    cfg = json.loads(scheduler_config.read_text())
    assert cfg["beta_schedule"] == "scaled_linear"
    betas = (
        torch.linspace(
            cfg["beta_start"] ** 0.5,
            cfg["beta_end"] ** 0.5,
            cfg["num_train_timesteps"],
            dtype=torch.float32,
        )
        ** 2
    )
    return float(torch.cumprod(1.0 - betas, dim=0)[t].double())


def unet_with_lora_by_hand(root: Path, lora_scale: float) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(root / "sd21-base/unet")
    state = unet.state_dict()
    lora = load_file(str(root / "osdface/pytorch_lora_weights.safetensors"))
    for key in [k for k in lora if k.endswith("lora_A.weight")]:
        module = key[len("unet.") : -len(".lora_A.weight")]
        a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
        w = state[f"{module}.weight"]
        delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
        state[f"{module}.weight"] = w + lora_scale * delta
    unet.load_state_dict(state)
    return unet.eval()


def reference_osdface(root: Path, released_vre: dict, released_proj: dict) -> AuthorsStyleBaseline:
    """The authors'-style per-image inference (bench/baseline.py) on the parts above."""
    cfg = json.loads((root / "osdface/config.json").read_text())
    vre_state = {
        k[len("vqvae_LQ.") :]: v
        for k, v in released_vre.items()
        if k.startswith("vqvae_LQ.") and ".decoder." not in k
    }
    t = cfg["timestep"]
    return AuthorsStyleBaseline(
        prompt=partial(
            prompt_by_hand, vre_state=vre_state, proj_state=released_proj, cfg=cfg["vre"]
        ),
        vae=AutoencoderKL.from_pretrained(root / "sd21-base/vae").eval(),
        unet=unet_with_lora_by_hand(root, cfg["lora_alpha"] / cfg["lora_rank"]),
        alpha_bar=alpha_bar_by_hand(root / "sd21-base/scheduler/scheduler_config.json", t),
        timestep=t,
        device=torch.device("cpu"),
    )
