"""`osdface restore --ray`: whole photos restored on a Ray cluster with Ray Data.

The driver's side; the stages the workers run are in `osdface/restore/ray_stages.py`:

    plan (driver): list inputs, name outputs, skip the ones that exist, refuse any clash
    Prepare (CPU actors): read the file, decode, detect, align        -> uint8 crops
    RestoreFaces (one restorer per actor; a GPU each, or CPU shares): the faces of several
        photos cut into model calls of `batch_size` faces            -> restored faces
        (with --background, also each photo's upscaled background, on the same device)
    finish (CPU tasks): paste back, encode, write atomically (and --save-faces' crops)
                                                                       -> one report record
    driver: one JSON line per input in `--report`, a summary, the exit code

Each stage scales on its own: Ray Data streams rows between them and starts more CPU actors or
tasks while the restorer actors stay busy. The photo functions are the local CLI's and the
service's (`model.media.pipeline`), so with the same settings, the same model-call sizes and the same
thread count, outputs are byte for byte the local CLI's. A file that fails at any stage becomes
a failed record; the others go on. Ray is imported only when `--ray` is used.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osdface.restore import plan as local_plan
from osdface.restore import uris
from osdface.common import UsageError
from osdface.restore.ray_stages import Job, RunConfig, build_dataset, stage_resources
from osdface.restore.reporting import Record, Reporter

logger = logging.getLogger("osdface.restore")


@dataclass
class RayPlan:
    """Photos to restore, photos whose output exists (skipped), files of no image kind."""

    jobs: list[Job] = field(default_factory=list)
    existing: list[Job] = field(default_factory=list)
    unsupported: list[Any] = field(default_factory=list)
    subfolders: list[Path] = field(default_factory=list)  # not read: no -r


# --- plan (driver, before Ray or torch is imported) ----------------------------------------


def plan_jobs(
    inputs: list[str],
    output: str,
    *,
    recursive: bool = False,
    suffix: str = "",
    output_format: str | None = None,
    overwrite: bool = False,
    report: Path | None = None,
) -> RayPlan:
    """Local paths: the local CLI's plan (osdface/restore/plan.py), exactly; URIs: `plan_uris`."""
    if not any(uris.is_uri(item) and not item.startswith("file://") for item in [*inputs, output]):
        found = local_plan.make_plan(
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

        def ray_job(job: local_plan.Job) -> Job:
            return Job(str(job.source), str(job.target), job.output_format)

        return RayPlan(
            [ray_job(j) for j in found.jobs],
            [ray_job(j) for j in found.existing],
            found.unsupported,
            found.subfolders,
        )
    if recursive or suffix:
        raise UsageError("--recursive and --suffix take local folders; with URIs, name them all")
    return plan_uris(inputs, output, output_format, overwrite=overwrite)


def plan_uris(
    inputs: list[str], output: str, output_format: str | None, *, overwrite: bool = False
) -> RayPlan:
    """Inputs and output on any pyarrow filesystem (s3://, gs://, ...); refuses every clash."""
    out = uris.normalize(output)
    sources, unsupported = [], []
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
                (sources if _is_image(found) else unsupported).append(found)
        else:
            sources.append(location)
    jobs: dict[str, Job] = {}
    for source in sources:
        name = Path(uris.basename(source))
        fmt = output_format or local_plan.image_format(name.suffix)
        target = uris.join(out, local_plan.target_name("image", name, "", fmt))
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
    return RayPlan(
        [j for t, j in jobs.items() if t not in present],
        [j for t, j in jobs.items() if t in present],
        unsupported,
    )


def _is_image(location: str) -> bool:
    return location.lower().endswith(local_plan.KINDS["image"])


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
    if not logger.isEnabledFor(logging.DEBUG):  # Ray Data's plans, timings and notices: -v
        logging.getLogger("ray.data").setLevel(logging.ERROR)
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
                reporter.record(Record(job.source, job.target, "failed", error=why))
    finally:
        ray.shutdown()


def _env_address() -> str | None:
    import os

    return os.environ.get("RAY_ADDRESS") or None


# --- the command line's entry --------------------------------------------------------------


def local_cluster(address: str | None) -> bool:
    """No address given and none in RAY_ADDRESS: `ray.init` starts a cluster on this machine."""
    return not address and not _env_address()


def restore(address: str | None, plan: RayPlan, settings: Any, options: Any, args: Any) -> int:
    """Run a checked plan (osdface/restore/command.py checked flags, paths and weights): the exit code,
    0 all restored or skipped, 1 any file failed."""
    import sys

    config = RunConfig(
        settings,
        options,
        settings.max_batch_faces,
        dtype=settings.dtype,
        device=settings.device,
        merge_lora=not args.no_merge,
        latent=settings.latent,
        seed=settings.seed if settings.latent == "sample" else None,
        save_faces=args.save_faces,
    )
    logger.info("%d inputs to restore, %d outputs exist", len(plan.jobs), len(plan.existing))
    tty = sys.stderr.isatty()
    reporter = Reporter(len(plan.jobs), quiet=args.quiet, tty=tty, report=args.report)
    reporter.summary.unsupported = len(plan.unsupported)
    try:
        with reporter.redirect_logging():
            run(address, plan.jobs, plan.existing, config, reporter, num_cpus=args.ray_cpus)
    finally:
        reporter.close()
    return reporter.summary.exit_code


def root_cause(exc: BaseException) -> str:
    """The last line of a Ray error, which names the worker's own exception."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours its messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__
