"""`osdface weights fetch|convert|merge|verify`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from model.runtime.settings import env_name
from osdface.common import UsageError, default_weights_dir, plural

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    text = "fetch, convert, merge and verify model weights"
    weights = sub.add_parser("weights", help=text, description=f"{text} (docs/weights.md)")
    wsub = weights.add_subparsers(title="weights commands")
    weights.set_defaults(func=lambda _args: weights.print_help() or 2)
    for name, func, text in (
        ("fetch", _weights_fetch, "download what is missing (resumable, checksummed)"),
        ("convert", _weights_convert, "released pickles -> safetensors, without running pickle"),
        ("merge", _weights_merge, "fuse the LoRA into the UNet and save it as safetensors"),
        ("verify", _weights_verify, "check every file's sha256 and load everything strictly"),
    ):
        p = wsub.add_parser(name, help=text)
        p.add_argument(
            "--dir",
            type=Path,
            default=default_weights_dir(),
            help=f"weights folder (default: %(default)s; env {env_name('weights_dir')})",
        )
        p.set_defaults(func=func)
        if name in ("convert", "merge"):
            p.add_argument("--force", action="store_true", help="redo it even if up to date")
        if name == "fetch":
            p.add_argument("--manifest", type=Path, help="a manifest of your own (same JSON shape)")
            p.add_argument("--sd-repo", help="a mirror of stabilityai/stable-diffusion-2-1-base")
            p.add_argument("--all", action="store_true", help="also optional files")
            p.add_argument("--train", action="store_true", help="also the training loss networks")
            p.add_argument(
                "--background", action="store_true", help="also Real-ESRGAN x2/x4 (background)"
            )
            p.add_argument("--eval", action="store_true", help="also the metric networks")


def _weights_fetch(args: argparse.Namespace) -> int:
    from weights.fetch import fetch, load_manifest

    if args.manifest is not None:  # read now: a typo fails in a second, not after downloads
        try:
            load_manifest(args.manifest)
        except OSError as exc:
            raise UsageError(f"--manifest {args.manifest}: {exc.strerror}") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(
                f"--manifest {args.manifest} is not a manifest ({exc}); it takes the JSON shape "
                "of weights/manifest.json"
            ) from exc
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the weights folder {args.dir}: {exc.strerror}; choose another "
            "with --dir"
        ) from exc

    fetched = fetch(
        args.dir,
        include_optional=args.all,
        include_train=args.train,
        include_background=args.background,
        include_eval=args.eval,
        sd_repo=args.sd_repo,
        manifest=args.manifest,
    )
    logger.info("%s fetched into %s", plural(len(fetched), "file"), args.dir)
    if args.background:  # ready to load: the pickles converted to safetensors, without pickle
        from weights.background import RELEASED, convert_background

        for name in RELEASED:
            convert_background(args.dir, name)
    return 0


def _require(root: Path, relative: list[str]) -> None:
    """Refuse (exit 2, nothing started) when input files of a step are not in the folder."""
    if not root.is_dir():
        missing = f"the weights folder {root} does not exist"
    else:
        absent = [name for name in relative if not (root / name).is_file()]
        if not absent:
            return
        missing = f"missing in {root}: {', '.join(absent)}"
    raise UsageError(f"{missing}; run `osdface weights fetch --dir {root}`")


def _up_to_date(args: argparse.Namespace, step: str) -> bool:
    """Decided before torch is imported, so an up-to-date `make serve` step takes a moment."""
    from weights.layout import WeightsLayout
    from weights.stamps import Step

    if args.force:
        return False
    current = getattr(Step, step)(WeightsLayout(args.dir)).is_current()
    if current:
        logger.info("%s: outputs in %s are up to date; nothing written", step, args.dir)
    return current


def _weights_convert(args: argparse.Namespace) -> int:
    from weights.layout import WeightsLayout

    layout = WeightsLayout(args.dir)
    released = [layout.released_vre, layout.released_projection]
    _require(args.dir, [str(p.relative_to(args.dir)) for p in released])
    _convert_backgrounds(args.dir)
    if _up_to_date(args, "convert"):
        return 0
    from model.config import OSDFaceConfig
    from weights.convert import convert_released

    convert_released(layout, OSDFaceConfig.load(layout.osdface), force=args.force)
    return 0


def _convert_backgrounds(root: Path) -> None:
    """Real-ESRGAN pickles -> safetensors. weights.background imports torch, so it is imported
    only when the folder has a released background file (an up-to-date `convert` stays fast)."""
    from weights.layout import BACKGROUND_FOLDER

    if not any((root / BACKGROUND_FOLDER).glob("*.pth")):
        return
    from weights.background import RELEASED, convert_background, released_path

    for name in RELEASED:
        if released_path(root, name).is_file():
            convert_background(root, name)


def _weights_merge(args: argparse.Namespace) -> int:
    from weights.layout import SAFETENSORS_NAME, WeightsLayout

    layout = WeightsLayout(args.dir)
    inputs = [layout.unet_dir / "config.json", layout.unet_dir / SAFETENSORS_NAME, layout.lora]
    _require(args.dir, [str(p.relative_to(args.dir)) for p in inputs])
    if _up_to_date(args, "merge"):
        return 0
    from model.config import OSDFaceConfig
    from weights.convert import write_merged_unet

    write_merged_unet(layout, OSDFaceConfig.load(layout.osdface), force=args.force)
    return 0


def _weights_verify(args: argparse.Namespace) -> int:
    from weights.layout import WeightsLayout, missing_for_restore

    # Before hashing gigabytes: what the restorer cannot load without (existence only).
    missing = missing_for_restore(WeightsLayout(args.dir))
    if missing:
        if not args.dir.is_dir():
            _require(args.dir, [])
        raise UsageError(
            f"missing in {args.dir}: {'; '.join(missing)}; run `osdface weights fetch "
            f"--dir {args.dir}`, then `convert` and `merge` with the same --dir"
        )
    from model.networks.background import BackgroundUpscaler
    from model.networks.restorer import OSDFaceRestorer
    from weights.background import present_backgrounds
    from weights.fetch import verify

    for path, digest in verify(args.dir).items():
        print(f"{digest}  {path}")  # noqa: T201 - the command's output
    OSDFaceRestorer.from_pretrained(args.dir)
    for name in present_backgrounds(args.dir):
        BackgroundUpscaler.from_pretrained(args.dir, name)
    logger.info("all weights load strictly")
    return 0
