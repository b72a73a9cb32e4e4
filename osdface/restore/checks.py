"""What `osdface restore` (and `osdface serve`) checks before anything heavy: the weight,
detector and background files, the output folders, and what the plan leaves out.

No torch here: each check answers in a fraction of a second with a UsageError (exit 2) that
says what to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from model.config import BACKGROUND_SCALES
from model.media.faces.detectors import DETECTORS
from model.runtime.settings import RuntimeSettings
from osdface.common import UsageError, plural
from osdface.restore.plan import Plan
from weights.layout import WeightsLayout, background_file, missing_for_restore

logger = logging.getLogger("osdface.restore")


def check_weights(
    settings: RuntimeSettings,
    *,
    aligned: bool = False,
    merged: bool = True,
    backgrounds: Sequence[str] = (),
    has_aligned_flag: bool = True,
) -> None:
    """UsageError naming what is missing (restorer, detector, background network) and what to
    run, before anything loads. `osdface serve` checks with it too (without --aligned)."""
    folder = settings.weights_dir
    missing = missing_for_restore(WeightsLayout(folder), merged=merged)
    if missing:
        raise UsageError(
            f"weights missing in {folder}: {'; '.join(missing)}. Run `osdface weights fetch "
            f"--dir {folder}` (then `convert` and `merge`), or point --weights / "
            "OSDFACE_WEIGHTS_DIR at a complete folder."
        )
    for name in backgrounds:
        converted = background_file(folder, BACKGROUND_SCALES[name])
        if not converted.is_file():
            released = background_file(folder, BACKGROUND_SCALES[name], ".pth").is_file()
            step = "convert" if released else "fetch --background"
            raise UsageError(
                f"the background network {name} ({converted}) is missing: run "
                f"`osdface weights {step} --dir {folder}`, or choose another background"
            )
    if not aligned:
        _check_detector(settings, has_aligned_flag)


def _check_detector(settings: RuntimeSettings, has_aligned_flag: bool) -> None:
    folder = settings.weights_dir
    detector = folder / "facexlib" / DETECTORS[settings.detector].filename
    if detector.is_file():
        return
    others = [
        name for name, spec in DETECTORS.items() if (folder / "facexlib" / spec.filename).is_file()
    ]
    hint = f"--detector {others[0]}" if others else "--detector retinaface_mobile0.25"
    raise UsageError(
        f"the face detector file {detector} is missing ({settings.detector}). "
        f"`osdface weights fetch --dir {folder}` downloads it, or use {hint} "
        "(OSDFACE_DETECTOR)" + ("; --aligned crops need no detector." if has_aligned_flag else ".")
    )


def check_writable(output: Path, report: Path | None) -> None:
    """Create the output folder (and the report's) now: an unwritable one fails every file."""
    for folder in (output, report.parent if report is not None else None):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the folder {folder}: {exc.strerror}") from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write into {folder}: choose another with -o / --report")


def warn_left_out(plan: Plan) -> None:
    """Files of no supported kind, and sub-folders not read without -r: named, not silent."""
    if plan.unsupported:
        logger.warning(
            "skipping %s of no supported kind: %s",
            plural(len(plan.unsupported), "file"),
            some(plan.unsupported),
        )
    if plan.subfolders:
        logger.warning(
            "not reading %s: %s; add -r to restore them too (same tree in the output)",
            plural(len(plan.subfolders), "sub-folder"),
            some(plan.subfolders),
        )


def subfolder_hint(subfolders: Sequence[Path]) -> str:
    if not subfolders:
        return ""
    return f"; add -r to read its {plural(len(subfolders), 'sub-folder')} ({some(subfolders)})"


def some(paths: Sequence[Path | str], shown: int = 10) -> str:
    """The first `shown` paths, and how many more."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(str(p) for p in paths[:shown]) + more
