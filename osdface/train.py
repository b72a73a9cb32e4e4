"""`osdface train stage1 ...` and `osdface train stage2 ...` (registered by `osdface/cli.py`).

One process trains on one device; for several GPUs start it under a launcher, e.g.
`accelerate launch --multi_gpu --num_processes 8 -m osdface train stage2 ...` or
`torchrun --nproc_per_node 8 -m osdface train stage2 ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_SHORTCUTS = (  # flag, config key
    ("--train-dir", "data.train_dir"),
    ("--val-dir", "data.val_dir"),
    ("--weights", "weights_dir"),
    ("--output", "engine.output_dir"),
    ("--resume", "engine.resume"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train OSDFace on a folder of aligned faces")
    stages = train.add_subparsers(title="stages")
    train.set_defaults(func=lambda _args: train.print_help() or 2)  # as `osdface weights` does
    for name, text in (
        ("stage1", "the VRE tokenizer: HQ/LQ VQ autoencoders, then their association"),
        ("stage2", "the one-step generator: LoRA on the SD2.1 UNet and the prompt projection"),
    ):
        p = stages.add_parser(name, help=text, description=text)
        p.add_argument("--config", type=Path, help="YAML or JSON file (any subset of fields)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one field, dotted path, e.g. engine.batch_size=4 (repeatable)",
        )
        for flag, key in _SHORTCUTS:
            p.add_argument(
                flag,
                dest=key.replace(".", "__"),
                metavar="PATH" if flag != "--resume" else "CKPT",
                help=f"same as --set {key}=...",
            )
        p.add_argument("--print-config", action="store_true", help="print the config and exit")
        p.set_defaults(func=_run, stage=name)


def _run(args: argparse.Namespace) -> int:
    from train.config import Stage1Config, Stage2Config, load_config, to_dict

    overrides = list(args.overrides)
    for _, key in _SHORTCUTS:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            overrides.append(f"{key}={value}")
    config: Stage1Config | Stage2Config
    if args.stage == "stage1":
        config = load_config(Stage1Config, args.config, overrides)
    else:
        config = load_config(Stage2Config, args.config, overrides)
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))  # noqa: T201 - the command's output
        return 0
    if isinstance(config, Stage1Config):
        from train.stage1 import run_stage1

        exported = run_stage1(config)
    else:
        from train.stage2 import run_stage2

        exported = run_stage2(config)
    if exported is not None:
        logger.info("exported %s", exported)
    return 0
