"""Training losses and the frozen networks they use.

Networks read their weights from `<weights>/train/` (see `TRAIN_WEIGHT_FILES`), never from the
internet at run time; tests build them with seeded random weights.

- Perceptual: VGG19 conv features (conv1_2, conv2_2, conv3_4, conv4_4, conv5_4, weights 0.1,
  0.1, 1, 1, 1, L1), the setting GFPGAN and CodeFormer use.
- DISTS (Ding et al. 2020): VGG16 with L2 pooling, structure and texture similarity per
  channel, learnt alpha/beta. EA-DISTS adds DISTS on Sobel edges of the luma.
- Identity: GFPGAN's ResNet-18 ArcFace on grey 128x128, 1 - cosine of the 512-d embeddings.
- Patch-GAN hinge losses with the adaptive weight of taming-transformers' VQGAN.
- Association: CLIP-style symmetric cross-entropy between HQ and LQ feature positions (DAEFR).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from model.errors import StateDictMismatchError, WeightsError, WeightsNotFoundError
from weights.strict import check_state_dict

M = TypeVar("M", bound=nn.Module)

logger = logging.getLogger(__name__)

TRAIN_WEIGHT_FILES = {
    "vgg19": "vgg19-dcbb9e9d.pth",  # torchvision's ImageNet VGG19 (perceptual loss)
    "vgg16": "vgg16-397923af.pth",  # torchvision's ImageNet VGG16 (DISTS backbone)
    "dists": "DISTS_weights.pt",  # DISTS alpha and beta (Ding et al., DISTS_pytorch)
    "arcface": "arcface_resnet18.pth",  # GFPGAN's identity network
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_weight_path(weights_dir: Path, name: str) -> Path:
    path = weights_dir / "train" / TRAIN_WEIGHT_FILES[name]
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path} is missing: the training losses need it (docs/training.md lists "
            "the files and where they come from)"
        )
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain pickled state dict, read with torch's tensors-only unpickler."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(f"{path}: not a loadable tensors-only state dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_frozen(what: str, model: M, state: dict[str, torch.Tensor]) -> M:
    """Strict load (every difference named), then eval mode and no gradients."""
    check_state_dict(what, model, state)
    model.load_state_dict(state)
    return freeze(model)


def freeze(model: M) -> M:
    return model.eval().requires_grad_(False)


def vgg_features(name: str) -> nn.Sequential:
    """torchvision's VGG `features` (same layer indices and names), without the classifier."""
    return make_layers(cfgs[{"vgg16": "D", "vgg19": "E"}[name]])


def _imagenet_normalise(x01: torch.Tensor) -> torch.Tensor:
    mean = x01.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x01.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


# --- perceptual (VGG19) ----------------------------------------------------------------------

# torchvision VGG19 `features` indices of conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 (before
# their ReLU, as BasicSR's PerceptualLoss takes them).
VGG19_LAYERS = {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}


class VGGPerceptual(nn.Module):
    """sum_l w_l * L1(VGG19_l(x), VGG19_l(y)) for images (B, 3, H, W) in [-1, 1], RGB."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features[: max(VGG19_LAYERS) + 1]
        freeze(self)

    @classmethod
    def from_weights(cls, weights_dir: Path) -> VGGPerceptual:
        state = read_state_dict(train_weight_path(weights_dir, "vgg19"))
        keep = {k: v for k, v in state.items() if k.startswith("features.")}
        model = cls(vgg_features("vgg19"))
        keep = {k: v for k, v in keep.items() if int(k.split(".")[1]) <= max(VGG19_LAYERS)}
        return load_frozen("VGG19", model, keep)

    @classmethod
    def random(cls, seed: int = 0) -> VGGPerceptual:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(vgg_features("vgg19"))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = _imagenet_normalise(torch.cat([x, y]) * 0.5 + 0.5)
        loss = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG19_LAYERS:
                hx, hy = h.chunk(2)
                loss = loss + VGG19_LAYERS[i] * F.l1_loss(hx, hy.detach())
        return loss


# --- DISTS and EA-DISTS ----------------------------------------------------------------------


class L2Pool(nn.Module):
    """DISTS' replacement for max pooling: sqrt(Hann-3x3 blur of x^2), stride 2."""

    filter: torch.Tensor  # a buffer, (channels, 1, 3, 3)

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.hann_window(5, periodic=False)[1:-1].double()  # (0.5, 1, 0.5)
        g = a[:, None] * a[None, :]
        g = (g / g.sum()).float()
        self.register_buffer("filter", g.expand(channels, 1, 3, 3).clone(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.filter.to(x.dtype), stride=2, padding=1, groups=self.channels)
        return (out + 1e-12).sqrt()


# VGG16 `features` index ranges of DISTS' five stages (each after an L2 pool but the first).
_DISTS_STAGES = ((0, 4), (5, 9), (10, 16), (17, 23), (24, 30))
DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)


class DISTS(nn.Module):
    """DISTS(x, y) per image, (B,), for (B, 3, H, W) RGB in [0, 1]. Frozen; 0 when x == y."""

    def __init__(self, vgg16_features: nn.Sequential, alpha: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        stages = []
        for k, (start, stop) in enumerate(_DISTS_STAGES):
            layers = [L2Pool(DISTS_CHANNELS[k])] if k > 0 else []
            stages.append(nn.Sequential(*layers, *vgg16_features[start:stop]))
        self.stages = nn.ModuleList(stages)
        total = sum(DISTS_CHANNELS)
        if alpha.shape != (1, total, 1, 1) or beta.shape != (1, total, 1, 1):
            raise WeightsError(f"DISTS alpha/beta must be (1, {total}, 1, 1)")
        self.alpha = nn.Parameter(alpha.clone())
        self.beta = nn.Parameter(beta.clone())
        freeze(self)

    @classmethod
    def from_weights(cls, weights_dir: Path) -> DISTS:
        vgg = read_state_dict(train_weight_path(weights_dir, "vgg16"))
        features = vgg_features("vgg16")
        load_frozen(
            "VGG16 (DISTS)",
            features,
            {k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")},
        )
        ab = read_state_dict(train_weight_path(weights_dir, "dists"))
        if set(ab) != {"alpha", "beta"}:
            raise StateDictMismatchError("DISTS weights", ["alpha", "beta"], sorted(ab))
        return cls(features, ab["alpha"].float(), ab["beta"].float())

    @classmethod
    def random(cls, seed: int = 0) -> DISTS:
        """Seeded VGG16 and alpha, beta ~ N(0.1, 0.01), the published network's initial values."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            features = vgg_features("vgg16")
            shape = (1, sum(DISTS_CHANNELS), 1, 1)
            alpha, beta = torch.randn(shape) * 0.01 + 0.1, torch.randn(shape) * 0.01 + 0.1
        return cls(features, alpha, beta)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [x], _imagenet_normalise(x)  # stage 0 is the raw [0, 1] image
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        feats = self._features(torch.cat([x, y]).float())
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, list(DISTS_CHANNELS), dim=1)
        betas = torch.split(self.beta / w_sum, list(DISTS_CHANNELS), dim=1)
        c1 = c2 = 1e-6
        score = x.new_zeros(b, dtype=torch.float32)
        for f, a, bt in zip(feats, alphas, betas, strict=True):
            fx, fy = f[:b].float(), f[b:].float()  # statistics in fp32 under autocast
            mx, my = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            texture = (2 * mx * my + c1) / (mx**2 + my**2 + c1)  # global means: texture
            vx = ((fx - mx) ** 2).mean((2, 3), keepdim=True)
            vy = ((fy - my) ** 2).mean((2, 3), keepdim=True)
            cov = (fx * fy).mean((2, 3), keepdim=True) - mx * my
            structure = (2 * cov + c2) / (vx + vy + c2)  # correlation: structure
            score = score + (a * texture).sum((1, 2, 3)) + (bt * structure).sum((1, 2, 3))
        return 1 - score


def sobel_luma(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB [0, 1] -> Sobel gradient magnitude of the luma, (B, 3, H, W) in [0, 1).

    BT.601 luma; both Sobel kernels are divided by 8, so the magnitude stays below 1/sqrt(2)
    and suits DISTS' [0, 1] input; repeated to 3 channels for the VGG.
    """
    luma = (0.299 * x01[:, 0] + 0.587 * x01[:, 1] + 0.114 * x01[:, 2]).unsqueeze(1)
    kx = x01.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = (g.pow(2).sum(1, keepdim=True) + 1e-12).sqrt()
    return magnitude.expand(-1, 3, -1, -1)


def ea_dists(dists: DISTS, out01: torch.Tensor, gt01: torch.Tensor) -> torch.Tensor:
    """Edge-aware DISTS, mean over the batch: DISTS(out, gt) + DISTS(Sobel(out), Sobel(gt))."""
    return (dists(out01, gt01) + dists(sobel_luma(out01), sobel_luma(gt01))).mean()


# --- identity (ArcFace) ----------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IRBlock(nn.Module):
    """Improved residual block: BN, conv, BN, PReLU, conv (strided), BN, + shortcut, PReLU.

    One PReLU serves both activations, as in the network the weights were trained with.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.prelu = nn.PReLU()
        self.conv2 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + shortcut)


class ArcFaceResNet18(nn.Module):
    """GFPGAN's identity network: grey (B, 1, 128, 128) in [-1, 1] -> (B, 512) embedding."""

    # Registered by name in __init__'s loop (the released checkpoint's names).
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(2, 2)
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(IRBlock(cin, width, stride), IRBlock(width, width))
            self.add_module(f"layer{i + 1}", layer)
            cin = width
        self.bn4 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc5 = nn.Linear(512 * 8 * 8, 512)
        self.bn5 = nn.BatchNorm1d(512)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.prelu(self.bn1(self.conv1(grey))))  # (B, 64, 64, 64)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 8, 8)
        x = self.dropout(self.bn4(x)).flatten(1)
        return self.bn5(self.fc5(x))


class IdentityLoss(nn.Module):
    """1 - cos(ArcFace(gt), ArcFace(out)), mean over the batch; images RGB in [-1, 1]."""

    def __init__(self, network: ArcFaceResNet18) -> None:
        super().__init__()
        self.network = freeze(network)

    @classmethod
    def from_weights(cls, weights_dir: Path) -> IdentityLoss:
        state = read_state_dict(train_weight_path(weights_dir, "arcface"))
        return cls(load_frozen("ArcFace ResNet-18", ArcFaceResNet18(), state))

    @classmethod
    def random(cls, seed: int = 0) -> IdentityLoss:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(ArcFaceResNet18())

    def train(self, mode: bool = True) -> IdentityLoss:
        super().train(False)  # BatchNorm statistics stay the recognition network's: always eval
        return self

    @staticmethod
    def grey128(image: torch.Tensor) -> torch.Tensor:
        """RGB [-1, 1] (B, 3, H, W) -> grey [-1, 1] (B, 1, 128, 128), as GFPGAN feeds it."""
        grey = 0.2989 * image[:, 0] + 0.5870 * image[:, 1] + 0.1140 * image[:, 2]
        return F.interpolate(grey.unsqueeze(1), (128, 128), mode="bilinear", align_corners=False)

    def forward(self, out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        e_out = self.network(self.grey128(out).float())
        with torch.no_grad():
            e_gt = self.network(self.grey128(gt).float())
        return (1 - F.cosine_similarity(e_out, e_gt, dim=1)).mean()


# --- GAN losses ------------------------------------------------------------------------------


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def softplus_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic loss: softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def softplus_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float
) -> torch.Tensor:
    """scale * ||d rec / d W_last|| / (||d g / d W_last|| + 1e-4), clamped to [0, 1e4].

    Balances the GAN term against reconstruction at the decoder's last layer (VQGAN).
    Returned detached: it is a weight, not a path for gradients.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    ratio = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return (ratio.clamp(0.0, 1e4) * scale).detach()


# --- association -----------------------------------------------------------------------------


def association_loss(hq: torch.Tensor, lq: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric cross-entropy of HQ-LQ position similarities against the diagonal.

    Args:
        hq, lq: (B, C, h, w) pre-quantisation features of a face and of its degraded twin.

    Per image, positions are L2-normalised C-vectors; logits (N, N) = cos / temperature with
    N = h*w; position i of the HQ face should pick position i of the LQ face and vice versa.
    About log N for unrelated features, near 0 for identical ones.
    """
    b, _, h, w = hq.shape
    with torch.autocast(hq.device.type, enabled=False):  # cosines / 0.07 need fp32, not bf16
        a = F.normalize(hq.float().flatten(2).transpose(1, 2), dim=-1)  # (B, N, C)
        z = F.normalize(lq.float().flatten(2).transpose(1, 2), dim=-1)
        logits = a @ z.transpose(1, 2) / temperature  # (B, N, N)
    n = h * w
    target = torch.arange(n, device=hq.device).repeat(b)
    forward = F.cross_entropy(logits.reshape(b * n, n), target)
    backward = F.cross_entropy(logits.transpose(1, 2).reshape(b * n, n), target)
    return 0.5 * (forward + backward)


def psnr(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,), images in [0, 1]."""
    mse = (x01.float() - y01.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)
