"""Which files `osdface restore` reads and where each result goes, checked before any model loads:
the one planner, for the local run and for `--ray` alike.

Nothing here imports torch: a wrong path, a collision or an output over an input is refused in
well under a second. Each input has a kind ("image", "video"; a new kind adds its suffixes to
`KINDS` and a naming rule to `target_name`), a source (None: stdin) and a target (None: stdout).
Locally they are `Path`s; with `--ray` they are strings (paths or URIs such as `s3://`), which
the workers open on their own machines (osdface/restore/uris.py).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from model.media.codecs.formats import EXTENSIONS, normalize_format
from model.media.codecs.heif import writable_formats
from model.media.video.config import VIDEO_SUFFIXES
from osdface.common import UsageError

logger = logging.getLogger(__name__)

STDIO = "-"
KINDS: dict[str, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif", ".avif"),
    "video": VIDEO_SUFFIXES,
}


@dataclass(frozen=True)
class Job:
    """One input and its output. source None: stdin; target None: stdout; a string with --ray."""

    source: Path | str | None
    target: Path | str | None
    output_format: str | None  # None: the input's (sniffed from the bytes); videos: None
    kind: str = "image"

    @property
    def name(self) -> str:
        return str(self.source) if self.source is not None else "<stdin>"


@dataclass
class Plan:
    """What to do: jobs to run, jobs whose output exists (skipped), files of no known kind,
    sub-folders of an input folder that were not read (no -r)."""

    jobs: list[Job] = field(default_factory=list)
    existing: list[Job] = field(default_factory=list)
    unsupported: list[Path | str] = field(default_factory=list)
    subfolders: list[Path] = field(default_factory=list)


def kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return next((kind for kind, suffixes in KINDS.items() if suffix in suffixes), None)


def target_name(kind: str, rel: Path, suffix: str, output_format: str | None) -> str:
    """The output file name for an input at `rel`: the same name unless the format changes.

    A video keeps its container. An image's extension is lower-cased (IMG_1.HEIC -> IMG_1.heic).
    """
    if kind == "image" and output_format is not None:
        same = rel.suffix.islower() and normalize_format(rel.suffix) == output_format
        return f"{rel.stem}{suffix}{rel.suffix if same else '.' + EXTENSIONS[output_format]}"
    return f"{rel.stem}{suffix}{rel.suffix}"


def image_format(suffix: str) -> str:
    """Without --format an image keeps its name's format if this build can write it, else PNG."""
    fmt = normalize_format(suffix)
    return fmt if fmt in writable_formats() else "png"


def make_plan(
    inputs: list[str],
    output: Path | str,
    *,
    recursive: bool = False,
    suffix: str = "",
    output_format: str | None = None,
    overwrite: bool = False,
    report: Path | None = None,
    ray: bool = False,
) -> Plan:
    """Expand inputs, name the outputs, refuse every way an output could hit an input.

    Raises UsageError (missing input, output folder inside an input folder without `suffix`,
    an output equal to an input, two inputs writing one output, a file where the folder goes).
    `ray`: photos only, as strings, and inputs and output may be URIs (`_plan_for_ray`).
    """
    if ray:
        return _plan_for_ray(
            inputs, str(output), recursive, suffix, output_format, overwrite, report
        )
    folder = Path(output)
    fmt = normalize_format(output_format) if output_format else None
    if STDIO in inputs:
        if len(inputs) != 1:
            raise UsageError("'-' (stdin) cannot be mixed with other inputs")
        return Plan(jobs=[Job(None, None, fmt)])
    out = folder.resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"the output {folder} is a file; -o takes a folder")
    if not out.exists() and kind_of(out) is not None:
        raise UsageError(
            f"-o takes a folder, and {folder} looks like a file name. Results keep their "
            f"input's name inside the folder: try -o {folder.parent / folder.stem}/. For one "
            f"file named as you like: osdface restore - < INPUT > {folder}"
        )
    subfolders: list[Path] = []
    sources, unsupported = _expand(inputs, out, recursive, subfolders)
    _refuse_output_inside_inputs(inputs, out, suffix)
    jobs = _jobs(sources, out, suffix, fmt)
    plan = Plan(unsupported=unsupported, subfolders=subfolders)
    for job in jobs:
        exists = job.target is not None and Path(job.target).exists()
        (plan.existing if exists and not overwrite else plan.jobs).append(job)
    if report is not None and report.resolve() in {j.source for j in jobs}:
        raise UsageError(f"--report {report} is one of the inputs; name another file")
    return plan


def _expand(
    inputs: list[str], out: Path, recursive: bool, subfolders: list[Path]
) -> tuple[list[tuple[Path, Path]], list]:
    """(source, path relative to the output folder) for every input file; unsupported files.

    Without `recursive`, the sub-folders passed over are added to `subfolders`.
    """
    found: list[tuple[Path, Path]] = []
    unsupported: list[Path] = []
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item))] if glob.has_magic(item) else []
        paths = matches or [Path(item)]
        for path in paths:
            if path.is_dir():
                files = _walk(path, out, recursive, subfolders)
                pairs = [(f, f.relative_to(path)) for f in files]
            elif path.is_file():
                pairs = [(path, Path(path.name))]
            else:
                what = "no file matches" if glob.has_magic(item) else "no such file or folder"
                raise UsageError(f"{item}: {what}")
            for source, rel in pairs:
                if kind_of(source) is None:
                    unsupported.append(source)
                else:
                    found.append((source, rel))
    return found, unsupported


def _walk(folder: Path, out: Path, recursive: bool, subfolders: list[Path]) -> list[Path]:
    """Files of `folder` (and below, if recursive), sorted; hidden names and `out` left out.

    Sub-folders not entered (not recursive) are added to `subfolders`.
    """
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # hidden files, and the temporary files of an interrupted run
        if path.is_dir():
            if path.resolve() == out:
                continue
            if recursive:
                files += _walk(path, out, recursive, subfolders)
            else:
                subfolders.append(path)
        elif path.is_file():
            files.append(path)
    return files


def _refuse_output_inside_inputs(inputs: list[str], out: Path, suffix: str) -> None:
    if suffix:
        return  # names cannot collide; results already there are recognised and not re-read
    for item in inputs:
        folder = Path(item).resolve()
        if folder.is_dir() and (out == folder or folder in out.parents):
            beside = os.path.relpath(folder.parent / f"{folder.name or 'root'}-restored")
            raise UsageError(
                f"the output folder {out} is inside the input folder {item}: results would "
                f"overwrite or mix with the originals. Choose another folder, e.g. -o {beside}, "
                "or add --suffix _restored to name outputs apart."
            )


def _jobs(sources: list[tuple[Path, Path]], out: Path, suffix: str, fmt: str | None) -> list[Job]:
    jobs: list[Job] = []
    by_target: dict[Path, Job] = {}
    seen: set[Path] = set()
    for source, rel in sources:
        if source.resolve() in seen:
            continue  # named twice (a folder and a file in it, two overlapping globs)
        seen.add(source.resolve())
        kind = kind_of(source) or "image"
        # Without --format an image keeps its name's format; the bytes may say otherwise and
        # are converted, so that the output's name is known before anything is decoded.
        own = (fmt or image_format(source.suffix)) if kind == "image" else None
        target = out / rel.parent / target_name(kind, rel, suffix, own)
        job = Job(source.resolve(), target, own, kind)
        if target in by_target:
            raise UsageError(
                f"{by_target[target].source} and {source} would both be written to {target}; "
                "restore them in separate runs with different -o folders"
            )
        by_target[target] = job
        jobs.append(job)
    resolved = {job.source for job in jobs}
    for job in jobs:
        if job.target in resolved and job.target == job.source:
            raise UsageError(
                f"the output {job.target} is the input itself; choose another folder with -o "
                "or add --suffix"
            )
    # A result of an earlier run with --suffix, found again in the input folder: not an input.
    return [job for job in jobs if job.source not in by_target]


# --- --ray: the same plan as strings, and URIs --------------------------------------------------


def _plan_for_ray(
    inputs: list[str],
    output: str,
    recursive: bool,
    suffix: str,
    output_format: str | None,
    overwrite: bool,
    report: Path | None,
) -> Plan:
    """Local paths: the local plan, exactly, as strings; URIs: `plan_uris`."""
    from osdface.restore import uris  # pyarrow: only with --ray

    if STDIO in inputs:
        raise UsageError("- (stdin) is not available with --ray; run without --ray")
    if any(uris.is_uri(item) and not item.startswith("file://") for item in [*inputs, output]):
        if recursive or suffix:
            raise UsageError(
                "--recursive and --suffix take local folders; with URIs, name them all"
            )
        return plan_uris(inputs, output, output_format, overwrite=overwrite)
    found = make_plan(
        [item.removeprefix("file://") for item in inputs],
        Path(output.removeprefix("file://")),
        recursive=recursive,
        suffix=suffix,
        output_format=output_format,
        overwrite=overwrite,
        report=report,
    )
    videos = [j.name for j in found.jobs + found.existing if j.kind != "image"]
    if videos:
        raise UsageError(f"--ray restores photos; restore videos without --ray ({videos[0]})")

    def as_strings(job: Job) -> Job:
        return Job(str(job.source), str(job.target), job.output_format)

    return Plan(
        [as_strings(j) for j in found.jobs],
        [as_strings(j) for j in found.existing],
        found.unsupported,
        found.subfolders,
    )


def plan_uris(
    inputs: list[str], output: str, output_format: str | None, *, overwrite: bool = False
) -> Plan:
    """Inputs and output on any pyarrow filesystem (s3://, gs://, ...); refuses every clash."""
    from osdface.restore import uris

    out = uris.normalize(output)
    sources: list[str] = []
    unsupported: list[Path | str] = []
    for item in inputs:
        location = uris.normalize(item)
        entry = uris.stat(location)
        if not entry.exists:
            raise UsageError(f"{item}: no such file or folder")
        if entry.is_dir:
            if uris.inside(out, location):
                raise UsageError(
                    f"the output folder {output} is inside the input folder {item}: results "
                    "would mix with the originals; choose another folder with -o"
                )
            for found in uris.list_files(location):
                (sources if kind_of(Path(found)) == "image" else unsupported).append(found)
        else:
            sources.append(location)
    jobs: dict[str, Job] = {}
    for source in sources:
        name = Path(uris.basename(source))
        fmt = normalize_format(output_format) if output_format else image_format(name.suffix)
        target = uris.join(out, target_name("image", name, "", fmt))
        if target in jobs:
            raise UsageError(
                f"{jobs[target].source} and {source} would both be written to {target}"
            )
        jobs[target] = Job(source, target, fmt)
    clash = set(jobs) & set(sources)
    if clash:
        raise UsageError(
            f"the output {sorted(clash)[0]} is an input; choose another folder with -o"
        )
    present = set() if overwrite else uris.existing(list(jobs))
    return Plan(
        [j for t, j in jobs.items() if t not in present],
        [j for t, j in jobs.items() if t in present],
        unsupported,
    )
