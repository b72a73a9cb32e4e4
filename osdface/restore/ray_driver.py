"""`osdface restore --ray`: whole photos restored on a Ray cluster with Ray Data.

The driver's side: the plan (osdface/restore/plan.py, as the local run: list inputs, name
outputs, skip the ones that exist, refuse any clash), the cluster, and one JSON line per input
in `--report`, a summary and the exit code. The stages the workers run (prepare, restore the
faces, finish) are in `osdface/restore/ray_stages.py`.

Each stage scales on its own: Ray Data streams rows between them and starts more CPU actors or
tasks while the restorer actors stay busy. The photo functions are the local CLI's and the
service's (`model.media.pipeline`), so with the same settings, the same model-call sizes and the
same thread count, outputs are byte for byte the local CLI's. A file that fails at any stage
becomes a failed record; the others go on. Ray is imported only when `--ray` is used.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from osdface.restore import ledger
from osdface.restore.config import RunConfig
from osdface.restore.plan import Plan
from osdface.restore.ray_stages import build_dataset, stage_resources
from osdface.restore.reporting import Record, Reporter

logger = logging.getLogger("osdface.restore")


def restore(config: RunConfig, plan: Plan) -> int:
    """Run a checked plan (osdface/restore/command.py checked the flags, paths and weights): the
    exit code, 0 all restored or skipped, 1 any file failed."""
    logger.info("%d inputs to restore, %d outputs exist", len(plan.jobs), len(plan.existing))
    reporter = Reporter(
        len(plan.jobs), quiet=config.quiet, tty=sys.stderr.isatty(), report=config.report
    )
    reporter.summary.unsupported = len(plan.unsupported)
    writer = ledger.start(config, plan.jobs)  # a local output folder's ledger; None for URIs
    try:
        with reporter.redirect_logging():
            run(config, plan, reporter, writer)
    finally:
        if writer is not None:
            writer.close()
        reporter.close()
    return reporter.summary.exit_code


def local_cluster(address: str | None) -> bool:
    """No address given and none in RAY_ADDRESS: `ray.init` starts a cluster on this machine."""
    return not address and not os.environ.get("RAY_ADDRESS")


def run(
    config: RunConfig, plan: Plan, reporter: Reporter, writer: ledger.Writer | None = None
) -> None:
    """Skip the plan's existing outputs, restore its jobs on the cluster (the one at
    `config.ray_address`, else RAY_ADDRESS's, else a local one), one record per input."""
    for job in plan.existing:
        reporter.record(Record(job.name, str(job.target), "skipped"))
    if not plan.jobs:
        return
    import ray
    import ray.data

    address = config.ray_address
    ray.init(
        address=address or None,
        num_cpus=config.ray_cpus if local_cluster(address) else None,
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
        by_name = {job.name: job for job in plan.jobs}
        why = "no result from Ray"
        try:
            for row in build_dataset(plan.jobs, config, res).iter_rows():
                record = Record.from_json(row["record"])
                seen.add(record.input)
                if writer is not None and record.status == "restored":
                    writer.written(by_name[record.input])
                reporter.record(record)
        except Exception as exc:  # the engine itself stopped: a stage's set-up, the cluster
            why = f"the Ray pipeline stopped: {root_cause(exc)}"
            logger.error("%s", why)
        for job in plan.jobs:  # every input not finished is still reported, as a failure
            if job.name not in seen:
                reporter.record(Record(job.name, str(job.target), "failed", error=why))
    finally:
        ray.shutdown()


def root_cause(exc: BaseException) -> str:
    """The last line of a Ray error, which names the worker's own exception."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours its messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__
