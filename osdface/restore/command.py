"""`osdface restore`: faces in photos, folders and aligned crops; never over an original.

Everything a run needs is checked before torch is imported: arguments, settings, paths, output
collisions, and the presence of the weight and detector files. Then each input goes through the
same pipeline as the HTTP service (model/media/pipeline.py); a failing file is named and skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from model.media.codecs.formats import normalize_format
from model.config import BACKGROUND_SCALES
from model.errors import InvalidInputError
from model.media.faces.detectors import DETECTORS
from model.options import RestoreOptions
from osdface.restore import video
from osdface.common import UsageError, plural
from osdface.restore.plan import KINDS, STDIO, Job, Plan, make_plan
from osdface.restore.reporting import Record, Reporter, failed
from service.schemas import RestoreForm
from service.settings import Settings
from weights.layout import WeightsLayout, background_file, missing_for_restore

logger = logging.getLogger("osdface.restore")

DEFAULT_OUTPUT = Path("results")
EXAMPLES = """examples:
  osdface restore photos/ -r                       every photo under photos/ -> results/, same tree
  osdface restore scans/*.jpg -o out --faces 0 --upscale 2 --report out/report.jsonl
  osdface restore --aligned crops/ --strength 0.7 -o restored_crops
  osdface restore - < face.jpg > restored.jpg      stdin to stdout
"""

# Flags backed by a setting of service/settings.py: its default, its OSDFACE_* variable.
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
# Flags backed by a field of the HTTP form (service/schemas.py): same names, bounds, defaults.
# Their help is their own: the form's descriptions speak of requests, headers and JSON.
FORM_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--strength", "strength", "1 = fully restored, 0 = the original"),
    ("--upscale", "upscale", "output scale; default: the --background network's, else 1"),
    (
        "--background",
        "background",
        "how the background is upscaled: Lanczos (none), or Real-ESRGAN x2/x4 "
        "(`osdface weights fetch --background`)",
    ),
    (
        "--format",
        "output_format",
        "png, jpeg (or jpg), webp, heic or avif; default: the input's format when this build "
        "can write it, else png",
    ),
    ("--quality", "quality", "JPEG / lossy WebP quality"),
    ("--only-center-face", "only_center_face", "restore only the face nearest the centre"),
    (
        "--faces",
        "faces",
        "restore only these faces, e.g. 0,2: indices into the largest-first list of a run "
        "without --faces (as --report lists them)",
    ),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore",
        help="restore faces in image files or folders",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    supported = ", ".join(s for suffixes in KINDS.values() for s in suffixes)
    # "*", not "+": `--ray photos/` hands its value over to the inputs after parsing (_RayFlag).
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help=f"files, folders, globs ({supported}), or -"
    )
    p.add_argument(
        "-o", "--output", help=f"output folder (default: {DEFAULT_OUTPUT}/; --ray: a URI too)"
    )
    p.add_argument("-r", "--recursive", action="store_true", help="also sub-folders; same tree")
    p.add_argument("--suffix", default="", help="added to output names (default: none)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist (skipped)")
    p.add_argument("--report", type=Path, help="write one JSON line per input to this file")
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 512x512 crops")
    p.add_argument("--save-faces", action="store_true", help="also write aligned/restored crops")
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA unmerged (slower)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no per-file lines")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # `osdface -v restore` stays on
        help="debug logging, tracebacks",
    )
    for flag, name, text in SETTING_FLAGS:
        _add_field_flag(p, flag, name, Settings.model_fields[name], text, settings=True)
    for flag, name, text in FORM_FLAGS:
        _add_field_flag(p, flag, name, RestoreForm.model_fields[name], text, settings=False)
    video.add_video_arguments(p)
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        action=_RayFlag,
        metavar="ADDRESS",
        help="restore photos on a Ray cluster (docs/scale-out.md): ADDRESS is auto, local, "
        "ray://HOST:PORT or HOST:PORT; without one, RAY_ADDRESS or else a local cluster",
    )
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local --ray cluster")
    p.set_defaults(func=run)


# What ray.init takes as an address; anything else after --ray is an input.
RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:]+\]:\d+")


class _RayFlag(argparse.Action):
    """`--ray [ADDRESS]`; a value that is no Ray address, or is an existing path, is an input.

    So `osdface restore --ray photos/ -o out/` restores photos/ on a local cluster instead of
    taking photos/ for the cluster's address. The value is kept in `ray_inputs`: argparse has
    already assigned the positional inputs, and run() puts it first among them.
    """

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        if value and (os.path.exists(value) or not RAY_ADDRESS.fullmatch(value)):
            namespace.ray_inputs = [value]
            value = ""
        setattr(namespace, self.dest, value)


def _add_field_flag(
    p: argparse.ArgumentParser, flag: str, name: str, field: Any, text: str, *, settings: bool
) -> None:
    """One flag for a pydantic field; its help shows the field's range, default and variable."""
    notes = [_range(field)]
    # A form field without a default value says in its help text what None means.
    if field.default is not None or settings:
        notes.append(f"default: {NONE_MEANS.get(name, field.default)}")
    if settings:
        notes.append(f"env OSDFACE_{name.upper()}")
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


def _range(field: Any) -> str:
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


# --- checks before anything heavy ----------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    args.inputs = _inputs(args)
    settings = _validated(Settings, _given(args, [n for _, n, _ in SETTING_FLAGS]), "setting")
    form = _validated(RestoreForm, _given(args, [n for _, n, _ in FORM_FLAGS]), "option")
    options = _restore_options(settings, form, args.aligned)
    if args.ray is not None:
        return _run_on_ray(args, settings, options)
    if STDIO in args.inputs and args.output:
        raise UsageError(
            "- writes its result to stdout, not into -o: drop -o (`osdface restore - < a.jpg > "
            "restored.jpg`), or name the file instead of - to write into a folder"
        )
    output = Path(args.output) if args.output else DEFAULT_OUTPUT
    plan = make_plan(args.inputs, output, **_plan_flags(args, options))
    if not plan.jobs and not plan.existing:
        supported = ", ".join(s for suffixes in KINDS.values() for s in suffixes)
        raise UsageError(
            f"no input files found in {' '.join(args.inputs)} ({supported})"
            + _subfolder_hint(plan.subfolders)
        )
    if any(job.kind == "video" for job in plan.jobs):
        if args.aligned:
            raise UsageError("--aligned takes aligned face crops, not videos")
        args.video_options = _video_options(args, settings, form)
    check_weights(
        settings, aligned=args.aligned, merged=not args.no_merge, backgrounds=_background(options)
    )
    if STDIO not in args.inputs:
        _check_writable(output, args.report)
    _warn_left_out(plan)
    return _execute(args, settings, options, plan)


def _inputs(args: argparse.Namespace) -> list[str]:
    """The positional inputs, after the one `--ray` took if it was no address (_RayFlag)."""
    inputs = [*getattr(args, "ray_inputs", []), *args.inputs]
    if not inputs:
        raise UsageError("no inputs: name photo or video files, folders, globs, or - for stdin")
    return inputs


def _plan_flags(args: argparse.Namespace, options: RestoreOptions) -> dict[str, Any]:
    """What the plan of inputs and outputs depends on, the same locally and with --ray."""
    return {
        "recursive": args.recursive,
        "suffix": args.suffix,
        "output_format": options.output_format,
        "overwrite": args.overwrite,
        "report": args.report,
    }


def _restore_options(settings: Settings, form: RestoreForm, aligned: bool) -> RestoreOptions:
    """What every photo of the run gets: the form's fields, the settings' face choices."""
    if aligned and form.background != "none":
        raise UsageError("--background needs whole photos, not --aligned crops")
    try:
        return RestoreOptions(
            aligned=aligned,
            only_center_face=form.only_center_face,
            max_faces=settings.max_faces,
            strength=form.strength,
            upscale=form.upscale,
            background=form.background,
            output_format=_output_format(form.output_format, settings),
            quality=form.quality,
            faces=form.faces,
            min_face_size=settings.min_face_size,
        ).validated()
    except InvalidInputError as exc:
        raise UsageError(str(exc)) from exc


def _warn_left_out(plan: Any) -> None:
    """Files of no supported kind, and sub-folders not read without -r: named, not silent."""
    if plan.unsupported:
        logger.warning(
            "skipping %s of no supported kind: %s",
            plural(len(plan.unsupported), "file"),
            _some(plan.unsupported),
        )
    if plan.subfolders:
        logger.warning(
            "not reading %s: %s; add -r to restore them too (same tree in the output)",
            plural(len(plan.subfolders), "sub-folder"),
            _some(plan.subfolders),
        )


def _subfolder_hint(subfolders: list[Path]) -> str:
    if not subfolders:
        return ""
    return f"; add -r to read its {plural(len(subfolders), 'sub-folder')} ({_some(subfolders)})"


def _some(paths: list[Path], shown: int = 10) -> str:
    """The first `shown` paths, and how many more."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(str(p) for p in paths[:shown]) + more


def _run_on_ray(args: argparse.Namespace, settings: Settings, options: RestoreOptions) -> int:
    """`--ray`: the same checks, then the photos on a Ray cluster (osdface/ray_driver.py)."""
    from osdface.restore import ray_driver, uris

    if STDIO in args.inputs:
        raise UsageError("- (stdin) is not available with --ray; run without --ray")
    address = args.ray or None  # None: RAY_ADDRESS, else a local cluster
    output = args.output or str(DEFAULT_OUTPUT)
    plan = ray_driver.plan_jobs(args.inputs, output, **_plan_flags(args, options))
    if not plan.jobs and not plan.existing:
        raise UsageError(
            f"no photos found in {' '.join(args.inputs)}" + _subfolder_hint(plan.subfolders)
        )
    if ray_driver.local_cluster(address):  # its workers read the weights from this machine
        check_weights(
            settings,
            aligned=args.aligned,
            merged=not args.no_merge,
            backgrounds=_background(options),
        )
    if not uris.is_uri(output):
        _check_writable(Path(output), args.report)
    elif args.report is not None:
        _check_writable(args.report.parent, None)
    _warn_left_out(plan)
    return ray_driver.restore(address, plan, settings, options, args)


def _output_format(name: str | None, settings: Settings) -> str | None:
    """'jpg', 'JPEG', 'png' -> 'jpeg', 'png'; one the settings allow."""
    if name is None:
        return None
    try:
        fmt = normalize_format(name)
    except InvalidInputError as exc:
        raise UsageError(f"--format: {exc}") from exc
    if fmt not in settings.allowed_formats:
        raise UsageError(f"--format must be one of {', '.join(settings.allowed_formats)}")
    return fmt


def _video_options(args: argparse.Namespace, settings: Settings, form: RestoreForm) -> Any:
    """The checked VideoOptions of the video flags, before the weights load."""
    shared = {
        "batch_size": settings.max_batch_faces,
        "strength": form.strength,
        "only_center_face": form.only_center_face,
        "max_faces": settings.max_faces,
    }
    try:
        return video.video_options(argparse.Namespace(**{**vars(args), **shared}))
    except InvalidInputError as exc:
        raise UsageError(f"video: {exc}") from exc


def _given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _validated(model: type[BaseModel], values: dict[str, Any], what: str) -> Any:
    """Build the settings or the options; a bad value names its flag and its variable."""
    try:
        if model is Settings and "max_batch_faces" in values:
            # The CLI has no queue; keep the service's "queue holds a batch" rule satisfied.
            queue = Settings.model_fields["max_queue_faces"].default
            values["max_queue_faces"] = max(int(values["max_batch_faces"]), queue)
        return model(**values) if model is Settings else model.model_validate(values)
    except ValidationError as exc:
        flags = {n: f for f, n, *_ in (*SETTING_FLAGS, *FORM_FLAGS)}
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            env = f" / OSDFACE_{name.upper()}" if what == "setting" and name else ""
            lines.append(f"{flags.get(name, name)}{env}: {err['msg']} (got {err['input']!r})")
        raise UsageError(f"invalid {what}: " + "; ".join(lines)) from exc


def _check_writable(output: Path, report: Path | None) -> None:
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


def _background(options: RestoreOptions) -> list[str]:
    return [] if options.background == "none" else [options.background]


def check_weights(
    settings: Settings,
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
    if aligned:
        return
    detector = folder / "facexlib" / DETECTORS[settings.detector].filename
    if not detector.is_file():
        others = [
            name
            for name, spec in DETECTORS.items()
            if (folder / "facexlib" / spec.filename).is_file()
        ]
        hint = f"--detector {others[0]}" if others else "--detector retinaface_mobile0.25"
        raise UsageError(
            f"the face detector file {detector} is missing ({settings.detector}). "
            f"`osdface weights fetch --dir {folder}` downloads it, or use {hint} "
            "(OSDFACE_DETECTOR)"
            + ("; --aligned crops need no detector." if has_aligned_flag else ".")
        )


# --- the run -----------------------------------------------------------------------------------


def _execute(
    args: argparse.Namespace, settings: Settings, options: RestoreOptions, plan: Plan
) -> int:
    from osdface.restore.runners import RUNNERS, group_size, load_context  # torch from here on

    tty = sys.stderr.isatty()
    stdio = STDIO in args.inputs
    reporter = Reporter(len(plan.jobs), quiet=args.quiet or stdio, tty=tty, report=args.report)
    reporter.summary.unsupported = len(plan.unsupported)
    for job in plan.existing:
        reporter.record(Record(job.name, str(job.target), "skipped"))
    try:
        if plan.jobs:
            context = load_context(settings, options, args, reporter)
            reporter.summary.restart_clock()  # time per face: without loading the model
            with reporter.redirect_logging():
                for group in _groups(plan.jobs, lambda kind: group_size(kind, context)):
                    for record in _run_group(RUNNERS[group[0].kind], group, context):
                        reporter.record(record)
    finally:
        reporter.close()
    return reporter.summary.exit_code


def _groups(jobs: list[Job], size: Callable[[str], int]) -> Iterator[list[Job]]:
    """Consecutive jobs of one kind, as many as that kind restores in one go."""
    group: list[Job] = []
    for job in jobs:
        if group and (job.kind != group[0].kind or len(group) >= size(group[0].kind)):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


def _run_group(runner: Callable[..., list[Any]], group: list[Job], context: Any) -> list[Any]:
    """Records of a group; when the group as a whole fails (its model call), each job alone."""
    try:
        return runner(group, context)
    except Exception as exc:
        logger.debug("traceback for %s", ", ".join(j.name for j in group), exc_info=True)
        if len(group) == 1:
            return [failed(group[0], exc)]
        return [record for job in group for record in _run_group(runner, [job], context)]
