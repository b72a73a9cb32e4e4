"""What the command groups share: the usage error (exit 2), counted nouns, the weights folder, and
the flags backed by a setting or an option field (their help built by one helper)."""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from model.runtime.settings import RuntimeSettings, env_name


class UsageError(Exception):
    """The command line cannot be run as given (exit 2); the message says what to do."""


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def default_weights_dir() -> Path:
    """OSDFACE_WEIGHTS_DIR, else the setting's default (./osdface-weights)."""
    default = RuntimeSettings.model_fields["weights_dir"].default
    return Path(os.environ.get(env_name("weights_dir"), default)).expanduser()


# Flags backed by a run-time setting (model/runtime/settings.py): (flag, setting, help). A
# command that has one of these settings as a flag takes it from here, so the flag is the same
# everywhere; its default and environment variable come from the setting.
SETTING_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--weights", "weights_dir", "weights folder"),
    ("--device", "device", "where the model runs"),
    ("--dtype", "dtype", "model precision"),
    ("--detector", "detector", "face detector (retinaface_mobile0.25: small and fast)"),
    ("--detect-threshold", "detect_threshold", "detector confidence to keep a face"),
    ("--detect-max-side", "detect_max_side", "detect on a copy at most this large"),
    ("--min-face-size", "min_face_size", "ignore faces smaller than this, in pixels"),
    ("--max-faces", "max_faces", "restore at most this many (largest) faces per photo"),
    ("--batch-size", "max_batch_faces", "faces per model call"),
    ("--latent", "latent", "VAE latent: deterministic mode or sample"),
    ("--seed", "seed", "seed for --latent sample"),
    ("--max-file-bytes", "max_upload_bytes", "larger files fail (not read)"),
    ("--max-pixels", "max_pixels", "larger images fail"),
    ("--max-output-pixels", "max_output_pixels", "larger results (after --upscale) fail"),
    ("--fast-path", "fast_path", "the restorer's fast path"),
    ("--compile", "compile", "torch.compile the UNet and VAE (CUDA; slow first batch)"),
    ("--torch-threads", "torch_threads", "CPU threads for the model"),
)
# What a setting's None default means, shown instead of "None".
NONE_MEANS = {"torch_threads": "one per core"}


def setting_flags(*names: str) -> tuple[tuple[str, str, str], ...]:
    """The SETTING_FLAGS entries of these settings, in this order."""
    by_name = {name: (flag, name, text) for flag, name, text in SETTING_FLAGS}
    return tuple(by_name[name] for name in names)


def add_field_flag(
    p: argparse._ActionsContainer,
    flag: str,
    name: str,
    field: FieldInfo,
    text: str,
    *,
    env: bool,
) -> None:
    """One flag for a pydantic field (a setting, or an option field), dest `name`, default None
    (not given). Its help shows the field's range, default and, for a setting (`env`), its
    OSDFACE_* variable."""
    notes = [_range(field)]
    # An option field without a default value says in its help text what None means.
    if field.default is not None or env:
        notes.append(f"default: {NONE_MEANS.get(name, field.default)}")
    if env:
        notes.append(f"env {env_name(name)}")
    shown = "; ".join(n for n in notes if n)
    help_text = (f"{text} ({shown})" if shown else text).replace("%", "%%")
    kind = _plain_type(field.annotation)
    if kind is bool:
        action = argparse.BooleanOptionalAction if field.default else "store_true"
        p.add_argument(flag, dest=name, action=action, default=None, help=help_text)
    elif typing.get_origin(kind) is typing.Literal:
        p.add_argument(flag, dest=name, choices=typing.get_args(kind), help=help_text)
    else:
        p.add_argument(flag, dest=name, help=help_text, metavar=name.split("_")[-1].upper())


def given(args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    """The values of the flags that were given (not None), by field name."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _range(field: FieldInfo) -> str:
    """'0..1' for a field bounded on both sides (ge and le), else ''."""
    low = next((c.ge for c in field.metadata if hasattr(c, "ge")), None)  # annotated_types.Ge
    high = next((c.le for c in field.metadata if hasattr(c, "le")), None)
    return f"{low:g}..{high:g}" if low is not None and high is not None else ""


def _plain_type(annotation: Any) -> Any:
    """`int | None` -> int; Annotated[int, ...] -> int."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation
