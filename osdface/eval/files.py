"""Where the metric networks' weight files live, and a guard that keeps pyiqa offline.

Every file sits under `<weights>/eval/`, with the file name its loader expects:

- `eval/pyiqa/<name>`: pyiqa's own checkpoints (pyiqa's download folder is pointed here);
- `eval/torch/hub/checkpoints/<name>`: torchvision ImageNet backbones (TORCH_HOME points at
  `eval/torch`, so torchvision finds them where it would have cached them);
- `eval/clip/RN50.pt`: OpenAI CLIP ResNet-50 (CLIP-IQA's backbone);
- `eval/arcface_resnet18.pth`, `eval/alignment_WFLW_4HG.pth`: identity and landmarks.

`osdface weights fetch --eval` downloads them (weights/manifest.json, group "eval"). `eval`
itself never downloads: every download function pyiqa, torchvision and CLIP call is replaced
by one that raises WeightsNotFoundError naming the file and the command that fetches it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from model.errors import WeightsNotFoundError

EVAL_DIR = "eval"
FETCH_HINT = "run `osdface weights fetch --eval --dir {root}` (docs/eval.md lists every file)"

PYIQA = "eval/pyiqa"
TORCHVISION = "eval/torch/hub/checkpoints"

# The files each metric needs, relative to the weights folder.
METRIC_FILES: dict[str, tuple[str, ...]] = {
    "psnr": (),
    "ssim": (),
    "lpips": (f"{PYIQA}/LPIPS_v0.1_alex-df73285e.pth", f"{TORCHVISION}/alexnet-owt-7be5be79.pth"),
    "dists": (f"{PYIQA}/DISTS_weights-f5e65c96.pth", f"{TORCHVISION}/vgg16-397923af.pth"),
    "musiq": (f"{PYIQA}/musiq_koniq_ckpt-e95806b9.pth",),
    "niqe": (f"{PYIQA}/niqe_modelparameters.mat",),
    "clipiqa": ("eval/clip/RN50.pt",),
    "maniqa": (f"{PYIQA}/ckpt_koniq10k.pt",),
    "deg": ("eval/arcface_resnet18.pth",),
    "lmd": ("eval/alignment_WFLW_4HG.pth",),
    "fid": (f"{PYIQA}/pt_inception-2015-12-05-6726825d.pth",),
}
FFHQ_STATS = f"{PYIQA}/ffhq_clean_trainval70k_512.npz"


def eval_path(root: Path, relative: str) -> Path:
    return Path(root) / relative


def missing_files(root: Path, metrics: list[str], *, ffhq_stats: bool = False) -> list[str]:
    """The files `metrics` need that are not under `root`, relative to it."""
    wanted = [f for m in metrics for f in METRIC_FILES[m]]
    if ffhq_stats:
        wanted.append(FFHQ_STATS)
    return [f for f in dict.fromkeys(wanted) if not (Path(root) / f).is_file()]


def require_files(root: Path, metrics: list[str], *, ffhq_stats: bool = False) -> None:
    """Raise WeightsNotFoundError listing every missing file and how to get it."""
    missing = missing_files(root, metrics, ffhq_stats=ffhq_stats)
    if missing:
        lines = [f"metric weights missing under {root}:"] + [f"  {f}" for f in missing]
        lines.append(FETCH_HINT.format(root=root))
        raise WeightsNotFoundError("\n".join(lines))


def _refuse(root: Path) -> Callable[..., NoReturn]:
    def refuse(url: str, dst: str | None = None, *args: object, **kwargs: object) -> NoReturn:
        target = dst if dst is not None else url
        raise WeightsNotFoundError(
            f"a metric network asked to download {url} (to {target}); eval never downloads: "
            + FETCH_HINT.format(root=root)
        )

    return refuse


@contextlib.contextmanager
def offline_pyiqa(root: Path) -> Iterator[None]:
    """pyiqa, torchvision, timm and CLIP read from `<root>/eval` and cannot download.

    Process-wide while active (environment and module attributes): build metrics inside it,
    from one thread.
    """
    import torch.hub

    root = Path(root).resolve()
    saved_env = {k: os.environ.get(k) for k in ("TORCH_HOME", "HF_HUB_OFFLINE")}
    os.environ["TORCH_HOME"] = str(root / EVAL_DIR / "torch")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import pyiqa.utils.download_util as download_util

    refuse = _refuse(root)
    patches = [
        (torch.hub, "download_url_to_file", refuse),
        (download_util, "download_url_to_file", refuse),
        (download_util, "DEFAULT_CACHE_DIR", str(root / PYIQA)),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
