"""`osdface restore --ray`: whole photos restored on a Ray cluster with Ray Data.

The driver's side; the stages the workers run are in `osdface/ray_stages.py`:

    plan (driver): list inputs, name outputs, skip the ones that exist, refuse any clash
    Prepare (CPU actors): read the file, decode, detect, align        -> uint8 crops
    RestoreFaces (one restorer per actor; a GPU each, or CPU shares): the faces of several
        photos cut into model calls of `batch_size` faces            -> restored faces
    finish (CPU tasks): paste back, encode, write atomically           -> one report record
    driver: one JSON line per input in `--report`, a summary, the exit code

Each stage scales on its own: Ray Data streams rows between them and starts more CPU actors or
tasks while the restorer actors stay busy. The photo functions are the local CLI's and the
service's (`model.pipeline`), so with the same settings, the same model-call sizes and the same
thread count, outputs are byte for byte the local CLI's. A file that fails at any stage becomes
a failed record; the others go on. Ray is imported only when `--ray` is used.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from osdface import uris
from osdface.ray_report import Record, Reporter
from osdface.ray_stages import Job, RunConfig, build_dataset, stage_resources

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class PlanError(ValueError):
    """The command cannot run as given (exit 2); the message says what to do."""


# --- plan (driver, before Ray or torch is imported) ----------------------------------------


def plan(
    inputs: list[str], output: str, output_format: str | None, *, overwrite: bool = False
) -> tuple[list[Job], list[Job]]:
    """(jobs to run, jobs whose output exists). Raises PlanError on any clash with an input."""
    from model.codecs.formats import EXTENSIONS, normalize_format

    out = uris.normalize(output)
    sources = []
    for item in inputs:
        location = uris.normalize(item)
        entry = uris.stat(location)
        if not entry.exists:
            raise PlanError(f"{item}: no such file or folder")
        if entry.is_dir:
            if uris.inside(out, location):
                raise PlanError(
                    f"the output folder {output} is inside the input folder {item}: results "
                    "would mix with the originals; choose another folder with -o"
                )
            sources += [f for f in uris.list_files(location) if _is_image(f)]
        else:
            sources.append(location)
    jobs: dict[str, Job] = {}
    for source in sources:
        stem, _, suffix = uris.basename(source).rpartition(".")
        fmt = normalize_format(output_format or suffix)
        target = uris.join(out, f"{stem}.{EXTENSIONS[fmt]}")
        if target in jobs:
            raise PlanError(f"{jobs[target].source} and {source} would both be written to {target}")
        jobs[target] = Job(source, target, fmt)
    clash = set(jobs) & set(sources)
    if clash:
        raise PlanError(f"the output {sorted(clash)[0]} is an input; choose another folder with -o")
    present = set() if overwrite else uris.existing(list(jobs))
    todo = [j for t, j in jobs.items() if t not in present]
    return todo, [j for t, j in jobs.items() if t in present]


def _is_image(location: str) -> bool:
    return location.lower().endswith(IMAGE_SUFFIXES)


def run(
    address: str | None,
    jobs: list[Job],
    existing: list[Job],
    config: RunConfig,
    reporter: Reporter,
    *,
    num_cpus: int | None = None,
) -> None:
    """Skip `existing`, restore `jobs` on the cluster, one record per input to `reporter`."""
    for job in existing:
        reporter.record(Record(job.source, job.target, "skipped"))
    if not jobs:
        return
    import ray
    import ray.data

    local = not address and not _env_address()
    ray.init(
        address=address or None,
        num_cpus=num_cpus if local else None,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False  # our log says per file
    try:
        res = stage_resources(ray.cluster_resources())
        logger.info("Ray cluster %s; stages %s", ray.cluster_resources(), res)
        seen: set[str] = set()
        why = "no result from Ray"
        try:
            for row in build_dataset(jobs, config, res).iter_rows():
                record = Record.from_json(row["record"])
                seen.add(record.input)
                reporter.record(record)
        except Exception as exc:  # the engine itself stopped: a stage's set-up, the cluster
            why = f"the Ray pipeline stopped: {root_cause(exc)}"
            logger.error("%s", why)
        for job in jobs:  # every input not finished is still reported, as a failure
            if job.source not in seen:
                reporter.record(Record.failed(job.source, job.target, why))
    finally:
        ray.shutdown()


def _env_address() -> str | None:
    import os

    return os.environ.get("RAY_ADDRESS") or None


# --- the command line's entry --------------------------------------------------------------


def restore_from_args(args: Any) -> int:
    """`osdface restore --ray ...`: 0 all restored or skipped, 1 any file failed, 2 usage."""
    from model.pipeline import RestoreOptions
    from service.settings import Settings

    try:
        address = check_address(args.ray)
        if args.save_faces:
            raise PlanError("--save-faces is not available with --ray")
        if getattr(args, "background", "none") != "none":
            raise PlanError("--background (Real-ESRGAN) is not available with --ray yet")
        options = RestoreOptions(
            aligned=args.aligned,
            only_center_face=args.only_center_face,
            max_faces=args.max_faces,
            strength=args.strength,
            upscale=args.upscale,
            quality=args.quality,
        ).validated()
        jobs, existing = plan(args.inputs, args.output, args.format, overwrite=args.overwrite)
    except (PlanError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    settings = Settings(weights_dir=args.weights, detector=args.detector)
    if not address and not _env_address():  # a local cluster reads the weights from here
        try:
            check_weights(settings.weights_dir, None if args.aligned else args.detector)
        except PlanError as exc:
            logger.error("%s", exc)
            return 2
    config = RunConfig(
        settings,
        options,
        args.batch_size,
        dtype=args.dtype,
        device=args.device,
        merge_lora=not args.no_merge,
        latent=args.latent,
        seed=args.seed,
    )
    logger.info("%d inputs to restore, %d outputs exist already", len(jobs), len(existing))
    reporter = Reporter(args.report)
    try:
        run(address, jobs, existing, config, reporter, num_cpus=args.ray_cpus)
    finally:
        reporter.close()
    return reporter.summary.exit_code


def check_address(value: str) -> str | None:
    """'' -> None (RAY_ADDRESS, else a local cluster); refuses an input path taken as address."""
    import os

    if not value:
        return None
    if "://" not in value and value != "auto" and os.path.exists(value):
        raise PlanError(
            f"--ray took {value!r}, a path, as the cluster address: write --ray=ADDRESS, "
            "or put --ray after the inputs"
        )
    return value


def check_weights(weights_dir: Path, detector: str | None) -> None:
    """The weights folder's parts exist (their contents are checked when the workers load)."""
    from weights.layout import WeightsLayout

    layout = WeightsLayout(weights_dir)
    for folder in (layout.osdface, layout.sd21):
        if not folder.is_dir():
            raise PlanError(
                f"no weights at {weights_dir} ({folder.name}/ is missing): run "
                "`osdface weights fetch` (then convert and merge), or give --weights DIR"
            )
    if detector is not None:
        from model.faces.detect import DETECTORS

        path = layout.facexlib / DETECTORS[detector].filename
        if not path.is_file():
            raise PlanError(
                f"the {detector} detector file {path} is missing: run `osdface weights fetch`, "
                "or choose --detector retinaface_mobile0.25 if its file is there"
            )


def root_cause(exc: BaseException) -> str:
    """The last line of a Ray error, which names the worker's own exception."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours its messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__
