"""An independent OSDFace reference, written plainly from the facts sheet for the parity tests.

Per image, as the authors' inference does it: a functional VQ encoder over the raw checkpoint
tensors, the per-token selection loop, the projection as explicit conv1d calls, the LoRA
added by hand (W + B @ A) to a fresh UNet, ᾱ computed from the scheduler's formula, the x0
formula in float64. It shares no code with `model/` beyond the diffusers classes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

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


def select_tokens_loop(z: torch.Tensor, codebook: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The authors' loop for ONE image. z: (N, C) features; returns (num_tokens, C)."""
    d = (z**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * z @ codebook.t()
    min_d, idx = d.min(dim=1)
    order = torch.sort(min_d, stable=True).indices
    kept: list[int] = []
    for pos in order.tolist():
        code = int(idx[pos].item())
        if code not in kept:
            kept.append(code)
        if len(kept) == num_tokens:
            break
    tokens = torch.zeros(num_tokens, codebook.shape[1])
    for row, code in enumerate(kept):
        tokens[row] = codebook[code]
    return tokens


def prompt_for(face01: torch.Tensor, vre_state: dict, proj_state: dict, cfg: dict) -> torch.Tensor:
    """face01: (3, H, W) in [0, 1] -> (num_tokens, prompt_dim)."""
    lq = face01.unsqueeze(0) * 2 - 1
    h = vq_encoder((lq - 0.5) / 0.5, vre_state, cfg)  # double normalisation, as released
    z = h[0].reshape(h.shape[1], -1).t()  # (N, C)
    tokens = select_tokens_loop(z, vre_state["quantize.embedding.weight"], cfg["num_tokens"])
    x = tokens.t().unsqueeze(0)  # (1, C, T)
    x = F.silu(F.conv1d(x, proj_state["conv1.weight"], proj_state["conv1.bias"]))
    x = F.silu(F.conv1d(x, proj_state["conv2.weight"], proj_state["conv2.bias"]))
    return x[0].t()


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


class ReferenceOSDFace:
    def __init__(self, root: Path, released_vre: dict, released_proj: dict) -> None:
        cfg = json.loads((root / "osdface/config.json").read_text())
        self.vre_cfg = cfg["vre"]
        self.t = cfg["timestep"]
        self.vre_state = {
            k[len("vqvae_LQ.") :]: v
            for k, v in released_vre.items()
            if k.startswith("vqvae_LQ.") and ".decoder." not in k
        }
        self.proj_state = released_proj
        self.unet = unet_with_lora_by_hand(root, cfg["lora_alpha"] / cfg["lora_rank"])
        self.vae = AutoencoderKL.from_pretrained(root / "sd21-base/vae").eval()
        self.a = alpha_bar_by_hand(root / "sd21-base/scheduler/scheduler_config.json", self.t)

    @torch.no_grad()
    def __call__(self, face01: torch.Tensor) -> torch.Tensor:
        """One face (3, H, W) in [0, 1] -> restored (3, H, W) in [0, 1]."""
        prompt = prompt_for(face01, self.vre_state, self.proj_state, self.vre_cfg).unsqueeze(0)
        lq = face01.unsqueeze(0) * 2 - 1
        z = self.vae.encode(lq).latent_dist.mode() * 0.18215
        eps = self.unet(z, self.t, encoder_hidden_states=prompt).sample
        x0 = ((z.double() - math.sqrt(1 - self.a) * eps.double()) / math.sqrt(self.a)).float()
        out = self.vae.decode(x0 / 0.18215).sample.clamp(-1, 1) * 0.5 + 0.5
        return out[0].clamp(0, 1)
