"""`osdface restore`: the flags (osdface/restore/flags.py) read once into a frozen `RunConfig`,
the checks before anything heavy (osdface/restore/checks.py), then the run: locally
(osdface/restore/runners.py), on a Ray cluster (osdface/restore/ray_driver.py), or through a
running service (`--url`: osdface/restore/remote_runner.py).

Nothing past this module sees the parsed flags; everything reads the `RunConfig`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from model.errors import InvalidInputError
from model.options import OptionFields, RestoreOptions
from model.runtime.messages import describe
from model.runtime.settings import RuntimeSettings, env_name
from osdface.common import SETTING_FLAGS, UsageError, given
from osdface.restore import checks, ledger, remote, video
from osdface.restore.config import DEFAULT_OUTPUT, RunConfig
from osdface.restore.flags import FORM_FLAGS, RAY_ADDRESS, add_parser, old_ray_form
from osdface.restore.plan import KINDS, STDIO, Job, Plan, make_plan
from osdface.restore.reporting import Record, Reporter, failed

__all__ = ["register", "run"]

logger = logging.getLogger("osdface.restore")


def register(sub: argparse._SubParsersAction) -> None:
    add_parser(sub).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config, plan = read_flags(args)
    if config.ray:
        return _run_on_ray(config, plan)
    if STDIO in config.inputs:
        _check_stdin()
    if config.remote is not None:
        return _run_remote(config, plan)
    checks.check_weights(
        config.settings,
        aligned=config.options.aligned,
        merged=config.merge_lora,
        backgrounds=config.backgrounds,
    )
    if STDIO not in config.inputs:
        checks.check_writable(Path(config.output), config.report)
    checks.warn_left_out(plan)
    return _execute(config, plan)


# --- the flags, read once -------------------------------------------------------------------


def read_flags(args: argparse.Namespace) -> tuple[RunConfig, Plan]:
    """The run's configuration and its plan of inputs and outputs; UsageError for a bad flag,
    setting, path or collision (nothing heavy has been imported)."""
    remote_flags = remote.remote_flags(args)
    inputs = _inputs(args)
    settings = _validated(RuntimeSettings, given(args, [n for _, n, _ in SETTING_FLAGS]))
    values = given(args, [n for _, n, _ in FORM_FLAGS])
    values |= {"aligned": args.aligned, "min_face_size": settings.min_face_size}
    form = _validated(OptionFields, values)
    options = _restore_options(settings, form)
    if STDIO in inputs and args.output and not args.ray:
        raise UsageError(
            "- writes its result to stdout, not into -o: drop -o (`osdface restore - < a.jpg > "
            "restored.jpg`), or name the file instead of - to write into a folder"
        )
    if args.compare and (STDIO in inputs or args.ray):
        raise UsageError(
            "--compare writes into the output folder, next to each result: not with "
            + ("- (stdout)" if STDIO in inputs else "--ray")
        )
    output = args.output or _default_output(inputs, args.suffix, args.ray)
    flags = {"recursive": args.recursive, "suffix": args.suffix, "overwrite": args.overwrite}
    plan = make_plan(
        inputs,
        output,
        **flags,
        output_format=options.output_format,
        report=args.report,
        ray=args.ray,
    )
    if not plan.jobs and not plan.existing:
        supported = ", ".join(s for suffixes in KINDS.values() for s in suffixes)
        what = "photos" if args.ray else f"input files ({supported})"
        raise UsageError(
            f"no {what} found in {' '.join(inputs)}" + checks.subfolder_hint(plan.subfolders)
        )
    videos = [Path(str(j.source)) for j in plan.jobs + plan.existing if j.kind == "video"]
    if videos and args.aligned:
        raise UsageError("--aligned takes aligned face crops, not videos")
    if videos and remote_flags is not None:
        remote.refuse_video_flags(args)
    config = RunConfig(
        settings,
        options,
        tuple(inputs),
        output,
        **flags,
        report=args.report,
        save_faces=args.save_faces,
        compare=args.compare,
        merge_lora=not args.no_merge,
        quiet=args.quiet,
        ray=args.ray,
        ray_address=args.ray_address,
        ray_cpus=args.ray_cpus,
        video=_video_flags(args, videos) if videos else None,
        remote=remote_flags,
    )
    if remote_flags is None:  # --url: once the service has said what it uses
        ledger.check_existing(config, plan)
    return config, plan


def _inputs(args: argparse.Namespace) -> list[str]:
    """The positional inputs; the old `--ray ADDRESS` form and a lone --ray-address refused."""
    if args.ray_address is not None and not args.ray:
        raise UsageError("--ray-address names the cluster of a --ray run: add --ray")
    if args.ray:
        for word in args.inputs:
            if RAY_ADDRESS.fullmatch(word) and not os.path.exists(word):
                raise UsageError(old_ray_form(word))
    if not args.inputs:
        raise UsageError("no inputs: name photo or video files, folders, globs, or - for stdin")
    return list(args.inputs)


def _validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """The settings (flags over the environment) or the options; a bad value names its flag,
    and for a setting its variable."""
    try:
        return model(**values) if model is RuntimeSettings else model.model_validate(values)
    except ValidationError as exc:
        setting = model is RuntimeSettings
        flags = {n: f for f, n, _ in (*SETTING_FLAGS, *FORM_FLAGS)}

        def label(name: str) -> str:
            if not setting:
                return flags.get(name, name)
            return f"{flags[name]} / {env_name(name)}" if name in flags else env_name(name)

        lines = describe(exc, label=label, known=model.model_fields, show_input=True)
        raise UsageError("; ".join(lines)) from exc


def _restore_options(settings: RuntimeSettings, form: OptionFields) -> RestoreOptions:
    """What every photo of the run gets: the flags' options, the settings' face choices."""
    if form.aligned and form.background != "none":
        raise UsageError("--background needs whole photos, not --aligned crops")
    try:
        return form.to_options(
            max_faces=settings.max_faces, allowed_formats=settings.allowed_formats
        )
    except InvalidInputError as exc:
        raise UsageError(_with_flag(str(exc))) from exc


def _with_flag(message: str) -> str:
    """'output_format must be ...' -> '--format must be ...': the option named by its flag."""
    for flag, name, _ in FORM_FLAGS:
        if message.startswith(f"{name} "):
            return flag + message.removeprefix(name)
    return f"--format: {message}" if message.startswith("output format") else message


def _video_flags(args: argparse.Namespace, videos: list[Path]) -> video.VideoFlags:
    """The checked video flags, before torch is imported; --start against each clip's length."""
    flags = video.video_flags(**{name: getattr(args, name) for name in video.VIDEO_FLAGS})
    video.check_start(flags.start, videos)
    return flags


def _default_output(inputs: list[str], suffix: str, ray: bool) -> str:
    """results/, unless that is inside an input folder (`osdface restore .` in a photo folder):
    then `<folder>-restored` beside that folder, said in a log line."""
    default = Path(DEFAULT_OUTPUT).resolve()
    if suffix or ray or STDIO in inputs:
        return DEFAULT_OUTPUT
    folders = [Path(item).resolve() for item in inputs if Path(item).is_dir()]
    around = [folder for folder in folders if folder in default.parents]
    if not around:
        return DEFAULT_OUTPUT
    folder = min(around, key=lambda p: len(p.parts))  # the outermost
    beside = os.path.relpath(folder.parent / f"{folder.name or 'root'}-restored")
    logger.info(
        "results go to %s/ (beside the input folder: %s/ would be inside it); -o chooses another",
        beside,
        DEFAULT_OUTPUT,
    )
    return beside


def _check_stdin() -> None:
    """An empty stdin, or a terminal, is answered before the model loads."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(
            "- reads a photo from stdin, which is a terminal here: pipe one in "
            "(`osdface restore - < photo.jpg > restored.jpg`)"
        )
    peek = getattr(sys.stdin.buffer, "peek", None)  # a BufferedReader's: waits, reads nothing
    if peek is not None and not peek(1):
        raise UsageError(
            "stdin is empty: pipe a photo in (`osdface restore - < photo.jpg > restored.jpg`)"
        )


# --- the run -----------------------------------------------------------------------------------


def _run_on_ray(config: RunConfig, plan: Plan) -> int:
    """`--ray`: the same checks, then the photos on a Ray cluster (ray_driver.py)."""
    from osdface.restore import ray_driver, uris

    if ray_driver.local_cluster(config.ray_address):  # its workers read this machine's weights
        checks.check_weights(
            config.settings,
            aligned=config.options.aligned,
            merged=config.merge_lora,
            backgrounds=config.backgrounds,
        )
    if not uris.is_uri(config.output):
        checks.check_writable(Path(config.output), config.report)
    elif config.report is not None:
        checks.check_writable(config.report.parent, None)
    checks.warn_left_out(plan)
    return ray_driver.restore(config, plan)


def _run_remote(config: RunConfig, plan: Plan) -> int:
    """`--url`: the service's settings read and checked, then the same run with the remote
    runner (remote_runner.py) in place of the local one."""
    from osdface.restore import remote_runner  # httpx, through osdface.client

    config = remote_runner.connect(config, plan)
    ledger.check_existing(config, plan)
    if STDIO not in config.inputs:
        checks.check_writable(Path(config.output), config.report)
    checks.warn_left_out(plan)
    return _execute(config, plan, remote_runner.restore)


Runner = Callable[[RunConfig, list[Job], Reporter, "ledger.Writer | None"], None]


def _execute(config: RunConfig, plan: Plan, restore: Runner | None = None) -> int:
    stdio = STDIO in config.inputs
    reporter = Reporter(
        len(plan.jobs), quiet=config.quiet or stdio, tty=sys.stderr.isatty(), report=config.report
    )
    reporter.summary.unsupported = len(plan.unsupported)
    for job in plan.existing:
        reporter.record(Record(job.name, str(job.target), "skipped"))
    writer = ledger.start(config, plan.jobs)
    try:
        if plan.jobs:  # nothing to do: no torch, no model
            (restore or _restore)(config, plan.jobs, reporter, writer)
    finally:
        if writer is not None:
            writer.close()
        reporter.close()
    return reporter.summary.exit_code


def _restore(
    config: RunConfig, jobs: list[Job], reporter: Reporter, writer: ledger.Writer | None
) -> None:
    from osdface.restore.runners import RUNNERS, group_size, load_context  # torch from here on

    by_name = {job.name: job for job in jobs}
    context = load_context(config, reporter)
    reporter.summary.restart_clock()  # time per face: without loading the model
    with reporter.redirect_logging():
        for group in _groups(jobs, lambda kind: group_size(kind, context)):
            for record in _run_group(RUNNERS[group[0].kind], group, context):
                if writer is not None and record.status == "restored":
                    writer.written(by_name[record.input])
                reporter.record(record)


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


def _run_group(runner: Callable[..., list[Record]], group: list[Job], context: Any) -> list[Record]:
    """The group's records; a runner's own failure (one it did not pin on a file) fails them all.
    Runners restore what they can: a photo whose model call fails is retried alone inside."""
    try:
        return runner(group, context)
    except Exception as exc:
        logger.debug("traceback for %s", ", ".join(j.name for j in group), exc_info=True)
        return [failed(job, exc) for job in group]
