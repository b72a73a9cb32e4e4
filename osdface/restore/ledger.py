"""What made each output: a small ledger in the output folder, so that a re-run skips an output
only when the settings that shape its pixels are the same as this run's.

`.osdface-run.jsonl` in the output folder (hidden: never read as an input), one JSON object a
line; for an output, its last line wins:

    {"settings": "<id>", "values": {...}, "extras": [...], "also": {...}}   a set of settings
    {"output": "trip/a.jpg", "settings": "<id>"}                         an output made with it

`values` are compared (the options, the face choice and detection, the latent, the weights,
a video's flags); `extras` are the files written beside a result (`--compare`, `--save-faces`):
a re-run asking for one the output was made without is a difference too. `also` records how
the pixels were computed (device, dtype, fast path, ...) without comparing it: the same
settings on another machine give the same picture within rounding.

A run that replaces outputs (`--overwrite`) first rewrites the ledger, atomically, without
their lines; every run appends its settings, then one line as each output is written, so a
kill loses at most the line of the output being written, and a line cut short is passed
over. An output with no line (written before outputs were recorded, or by a run killed just
then) is skipped with a note: its settings are unknown, and `--overwrite` redoes it. No torch
here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from model.atomic import write_atomic
from osdface.common import UsageError, plural
from osdface.restore.config import RunConfig
from osdface.restore.plan import STDIO, Job, Plan
from weights.layout import SAFETENSORS_NAME, WeightsLayout

logger = logging.getLogger("osdface.restore")

LEDGER = ".osdface-run.jsonl"
LOSSY = ("jpeg", "webp", "heic", "avif")  # formats whose files depend on --quality


@dataclass(frozen=True)
class Made:
    """The settings one output is made with: compared `values`, `extras` beside the result."""

    values: dict[str, Any]
    extras: tuple[str, ...] = ()
    also: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        text = json.dumps([self.values, sorted(self.extras)], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, now: Made) -> list[str]:
        """What `now` asks that these settings did not give, in words ([] when nothing)."""
        keys = sorted(set(self.values) | set(now.values))
        lines = [
            _difference(key, self.values.get(key), now.values.get(key))
            for key in keys
            if self.values.get(key) != now.values.get(key)
        ]
        return lines + [_difference(e, False, True) for e in now.extras if e not in self.extras]


def _difference(key: str, before: Any, now: Any) -> str:
    if key == "weights":
        return "other weights"
    return f"{key.replace('_', ' ')} {_shown(key, before)} (now {_shown(key, now)})"


# What a None value means, by key.
NONE_SHOWN = {"faces": "all", "duration": "to the end"}


def _shown(key: str, value: Any) -> str:
    if value is None:
        return NONE_SHOWN.get(key, "default")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def made_with(config: RunConfig, job: Job, weights: str) -> Made:
    """The settings that shape `job`'s output pixels in this run."""
    settings, options = config.settings, config.options
    values: dict[str, Any] = {"weights": weights, "latent": settings.latent}
    if settings.latent == "sample":
        values["seed"] = settings.seed
    detection = {
        "detector": settings.detector,
        "detect_threshold": settings.detect_threshold,
        "detect_max_side": settings.detect_max_side,
        "min_face_size": settings.min_face_size,
        "max_faces": options.max_faces,
        "only_center_face": options.only_center_face,
    }
    if job.kind == "video":
        flags = config.video
        values |= detection | {"strength": options.strength}
        if flags is not None:
            values |= {
                "codec": flags.codec,
                "crf": flags.crf,
                "start": flags.start,
                "duration": flags.duration,
                "smoothing": flags.smoothing,
            }
        return Made(values, also=_also(config))
    values |= {
        "strength": options.strength,
        "upscale": options.upscale,
        "background": options.background,
        "format": job.output_format,
    }
    if job.output_format in LOSSY:
        values["quality"] = options.quality
    if options.aligned:
        values["aligned"] = True
    else:
        faces = list(options.faces) if options.faces is not None else None
        values |= detection | {"faces": faces}
    extras = tuple(e for e in ("compare", "save_faces") if getattr(config, e))
    return Made(values, extras, _also(config))


def _also(config: RunConfig) -> dict[str, Any]:
    from osdface import __version__

    s = config.settings
    return {
        "device": s.device,
        "dtype": s.dtype,
        "fast_path": s.fast_path,
        "compile": s.compile,
        "merge_lora": config.merge_lora,
        "batch_size": s.max_batch_faces,
        "osdface": __version__,
        **({"service": config.remote.url} if config.remote is not None else {}),
    }


def weights_id(folder: Path) -> str:
    """A short id of the weights a run loads, without reading them: the sha256s that `osdface
    weights convert` and `merge` recorded for their inputs, and each loaded file's size."""
    layout = WeightsLayout(folder)
    parts: list[Any] = []
    for stamp in (layout.osdface / "vre.inputs.json", layout.merged_unet_dir / "inputs.json"):
        try:
            inputs = json.loads(stamp.read_text(encoding="utf-8")).get("inputs", {})
            parts.append(sorted((k, v.get("sha256")) for k, v in inputs.items()))
        except (OSError, ValueError, AttributeError):
            parts.append(None)
    for path in (
        layout.vre,
        layout.lora,
        layout.merged_unet_dir / SAFETENSORS_NAME,
        layout.unet_dir / SAFETENSORS_NAME,
        layout.vae_dir / SAFETENSORS_NAME,
    ):
        parts.append(path.stat().st_size if path.is_file() else None)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# --- reading, checking, writing ------------------------------------------------------------------


@dataclass
class Ledger:
    """An output folder's ledger: settings by id, and each output's settings id."""

    folder: Path
    settings: dict[str, Made] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> Ledger:
        """The ledger of `folder`; empty when there is none. Unreadable lines (a line cut
        short by a kill) are passed over."""
        ledger = cls(folder)
        try:
            lines = (folder / LEDGER).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return ledger
        for line in lines:
            try:
                entry = json.loads(line)
                if "output" in entry:
                    ledger.outputs[str(entry["output"])] = str(entry["settings"])
                elif "values" in entry:
                    made = Made(
                        dict(entry["values"]),
                        tuple(entry.get("extras", ())),
                        dict(entry.get("also", {})),
                    )
                    ledger.settings[str(entry["settings"])] = made
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
        return ledger

    def key(self, job: Job) -> str:
        """The output's name in the ledger: its path relative to the output folder."""
        assert job.target is not None
        return Path(job.target).resolve().relative_to(self.folder.resolve()).as_posix()

    def made(self, job: Job) -> Made | None:
        found = self.outputs.get(self.key(job))
        return self.settings.get(found) if found is not None else None


def local_folder(config: RunConfig) -> Path | None:
    """The output folder when it is one on this machine (not stdout, not a URI)."""
    if STDIO in config.inputs or "://" in config.output:
        return None
    return Path(config.output)


def check_existing(config: RunConfig, plan: Plan) -> None:
    """UsageError when outputs that exist were made with other settings (named, with what
    differs); a note for outputs whose settings are unknown. Nothing is written."""
    folder = local_folder(config)
    if folder is None or not plan.existing:
        return
    ledger = Ledger.read(folder)
    weights = config.weights_id or weights_id(config.settings.weights_dir)
    unknown = 0
    differing: Counter[str] = Counter()
    for job in plan.existing:
        before = ledger.made(job)
        if before is None:
            unknown += 1
            continue
        differences = before.differences(made_with(config, job, weights))
        if differences:
            differing[", ".join(differences)] += 1
    if differing:
        raise UsageError(_refusal(config.output, differing))
    if unknown:
        logger.warning(
            "%s in %s %s no record of the settings that made %s (written by an older osdface, "
            "or by a run stopped just then): skipped; add --overwrite to redo %s",
            plural(unknown, "output"),
            config.output.rstrip("/") + "/",
            "has" if unknown == 1 else "have",
            "it" if unknown == 1 else "them",
            "it" if unknown == 1 else "them",
        )


def _refusal(output: str, differing: Counter[str]) -> str:
    total = sum(differing.values())
    were, them = ("was", "it") if total == 1 else ("were", "them")
    output = output.rstrip("/") + "/"
    if len(differing) == 1:
        (what,) = differing
        made = f"{plural(total, 'output')} in {output} {were} made with {what}"
    else:
        groups = "; ".join(f"{n} with {what}" for what, n in differing.most_common(3))
        more = "; ..." if len(differing) > 3 else ""
        made = f"{plural(total, 'output')} in {output} {were} made with other settings "
        made += f"({groups}{more})"
    return f"{made}; add --overwrite to replace {them}, or choose another -o"


class Writer:
    """Records each output of a run as it is written (`written`); `close` at the end."""

    def __init__(self, ledger: Ledger, made: dict[str, Made]) -> None:
        self.ledger, self._made = ledger, made  # by job name
        path = ledger.folder / LEDGER
        cut = not _ends_a_line(path)
        self._file: IO[str] | None = path.open("a", encoding="utf-8")
        if cut:  # a line cut short by a kill: ours start on a line of their own
            self._file.write("\n")
        new = {m.id: m for m in made.values() if m.id not in ledger.settings}
        self._file.write(_jsonl([_settings_line(i, m) for i, m in new.items()]).decode())
        self._file.flush()

    def written(self, job: Job) -> None:
        made = self._made.get(job.name)
        if made is None or self._file is None:
            return
        line = {"output": self.ledger.key(job), "settings": made.id}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def start(config: RunConfig, jobs: Iterable[Job]) -> Writer | None:
    """Ready the ledger for a run about to write `jobs`, then a `Writer` appending a line per
    output. The old lines of outputs about to be replaced are dropped by rewriting the ledger
    atomically; otherwise it is only appended to (a re-run that writes nothing touches
    nothing)."""
    folder = local_folder(config)
    jobs = [job for job in jobs if job.target is not None]
    if folder is None or not jobs:
        return None
    ledger = Ledger.read(folder)
    weights = config.weights_id or weights_id(config.settings.weights_dir)
    made = {job.name: made_with(config, job, weights) for job in jobs}
    replaced = [ledger.key(job) for job in jobs if ledger.key(job) in ledger.outputs]
    for key in replaced:
        del ledger.outputs[key]
    if replaced:
        used = set(ledger.outputs.values())
        ledger.settings = {i: m for i, m in ledger.settings.items() if i in used}
        lines = [_settings_line(i, m) for i, m in sorted(ledger.settings.items())]
        lines += [{"output": k, "settings": v} for k, v in sorted(ledger.outputs.items())]
        write_atomic(folder / LEDGER, _jsonl(lines))
    return Writer(ledger, made)  # appends this run's settings that the ledger lacks


def _ends_a_line(path: Path) -> bool:
    """True for a ledger that is absent, empty, or whose last line is whole."""
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) == 0:
                return True
            f.seek(-1, 2)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


def _settings_line(settings_id: str, made: Made) -> dict[str, Any]:
    return {
        "settings": settings_id,
        "values": made.values,
        "extras": list(made.extras),
        "also": made.also,
    }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, default=str) + "\n" for line in lines).encode("utf-8")
