"""The eval loop: restore every LQ face (resumable), score it, write the per-image CSV.

Memory stays bounded: one batch of faces is in memory at a time; rows are appended to the CSV
after each batch, and restored faces are written to `<out>/restored/` (PNG, atomically), so an
interrupted run continues where it stopped: faces already restored are read back, images
already in the CSV are not scored again.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from model.atomic import atomic_path
from model.errors import InvalidInputError
from osdface.common import plural

if TYPE_CHECKING:
    from osdface.eval.scorers import Scorers

logger = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CSV_NAME = "per_image.csv"
RESTORED_DIR = "restored"
FACE_SIZE = 512


@dataclass(frozen=True)
class Pair:
    """One test face: its name (file stem), LQ file and HQ file (None without --hq)."""

    name: str
    lq: Path
    hq: Path | None


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InvalidInputError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def pair_images(lq_dir: Path, hq_dir: Path | None) -> list[Pair]:
    """LQ files paired with the HQ file of the same stem; every pair or a clear error."""
    lq = list_images(lq_dir)
    if not lq:
        raise InvalidInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {lq_dir}")
    if hq_dir is None:
        return [Pair(p.stem, p, None) for p in lq]
    hq = {p.stem: p for p in list_images(hq_dir)}
    missing = [p.name for p in lq if p.stem not in hq]
    if missing:
        raise InvalidInputError(
            f"{plural(len(missing), 'LQ image')} without an HQ file of the same name in {hq_dir}, "
            f"e.g. {missing[:5]}"
        )
    return [Pair(p.stem, p, hq[p.stem]) for p in lq]


def read_face(path: Path) -> np.ndarray:
    """An aligned face file -> uint8 (512, 512, 3) RGB; InvalidInputError otherwise."""
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
    except OSError as e:
        raise InvalidInputError(f"{path}: not a readable image ({e})") from e
    if rgb.shape[:2] != (FACE_SIZE, FACE_SIZE):
        raise InvalidInputError(
            f"{path}: aligned faces must be {FACE_SIZE}x{FACE_SIZE}, got "
            f"{rgb.shape[1]}x{rgb.shape[0]}"
        )
    return rgb


def write_png(rgb: np.ndarray, target: Path) -> None:
    """Write atomically: a temporary name in the same folder, then rename."""
    with atomic_path(target) as part:
        Image.fromarray(rgb).save(part, format="PNG")


class Progress:
    """A tqdm bar on a terminal; otherwise (a log file, CI) one log line per step, as
    `osdface restore` does, so logs hold no carriage returns."""

    def __init__(self, total: int, desc: str, unit: str = "face") -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit=unit, desc=desc, disable=not self.tty)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def update(self, names: list[str]) -> None:
        """`names`: the items just done."""
        self.done += len(names)
        self.bar.update(len(names))
        if not self.tty and names:
            logger.info("[%d/%d] %s %s", self.done, self.total, self.desc, ", ".join(names))


def batches(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class FaceRestorer(Protocol):
    """What restores eval's faces (osdface/eval/backends.py): uint8 (512, 512, 3) RGB each."""

    def restore(self, faces: list[np.ndarray]) -> list[np.ndarray]: ...


def restore_all(
    pairs: list[Pair], out_dir: Path, backend: FaceRestorer, batch_size: int
) -> list[str]:
    """Restore every LQ face whose restored PNG is not in `out_dir` yet.

    An unreadable or wrongly sized LQ file is logged and skipped (the others go on); returns
    the names of those skipped.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in pairs if not (out_dir / f"{p.name}.png").is_file()]
    if len(todo) < len(pairs):
        logger.info("%d of %d faces already restored", len(pairs) - len(todo), len(pairs))
    failed: list[str] = []
    with Progress(len(todo), "restored") as bar:
        for chunk in batches(todo, batch_size):
            faces = {}
            for pair in chunk:
                try:
                    faces[pair.name] = read_face(pair.lq)
                except InvalidInputError as e:
                    logger.error("skipped: %s", e)
                    failed.append(pair.name)
            if faces:
                restored = backend.restore(list(faces.values()))
                for name, face in zip(faces, restored, strict=True):
                    write_png(face, out_dir / f"{name}.png")
            bar.update([pair.name for pair in chunk])
    return failed


def read_rows(path: Path) -> dict[str, dict[str, float]]:
    """The CSV written so far: {name: {metric: value}}; empty when there is none."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {
            row["name"]: {k: float(v) for k, v in row.items() if k != "name" and v != ""}
            for row in csv.DictReader(f)
        }


def score_all(
    pairs: list[Pair],
    restored_dir: Path,
    csv_path: Path,
    metrics: list[str],
    build: Callable[[], Scorers],
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Score the faces the CSV lacks (or lacks a metric of), appending their rows.

    `build` makes the Scorers only when something is left to score. Returns every row.
    """
    rows = read_rows(csv_path)
    todo = [p for p in pairs if not set(metrics) <= set(rows.get(p.name, {}))]
    if not todo or not metrics:
        return rows
    logger.info("scoring %d faces (%d already in %s)", len(todo), len(pairs) - len(todo), csv_path)
    scorers = build()
    with Progress(len(todo), "scored") as bar:
        for chunk in batches(todo, batch_size):
            restored = [read_face(restored_dir / f"{p.name}.png") for p in chunk]
            hq_paths = [p.hq for p in chunk if p.hq is not None]  # all or none (pair_images)
            hq = [read_face(path) for path in hq_paths] if hq_paths else None
            scores = scorers.score(restored, hq)
            for i, pair in enumerate(chunk):
                new = {m: values[i] for m, values in scores.items()}
                rows[pair.name] = {**rows.get(pair.name, {}), **new}
            _write_rows(csv_path, rows, pairs)
            bar.update([pair.name for pair in chunk])
    return rows


def _write_rows(path: Path, rows: dict[str, dict[str, float]], pairs: list[Pair]) -> None:
    """The whole CSV, atomically, in the pairs' order (its size is bounded by the set's)."""
    columns = list(dict.fromkeys(m for r in rows.values() for m in r))
    with atomic_path(path) as part, part.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", *columns])
        for pair in pairs:
            if pair.name in rows:
                row = rows[pair.name]
                writer.writerow([pair.name, *(_fmt(row.get(c)) for c in columns)])


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))
