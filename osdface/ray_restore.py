"""`osdface restore --ray`: whole photos restored on a Ray cluster with Ray Data.

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
import pickle
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from osdface import uris
from osdface.ray_report import Record, Reporter, face_json, failure

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class PlanError(ValueError):
    """The command cannot run as given (exit 2); the message says what to do."""


@dataclass(frozen=True)
class Job:
    source: str
    target: str
    output_format: str


@dataclass(frozen=True)
class RunConfig:
    """Everything the workers need; plain data, pickled once into each stage."""

    settings: Any  # service.settings.Settings (weights, detector, limits)
    options: Any  # model.pipeline.RestoreOptions, output_format set per job
    batch_size: int  # faces per restorer call
    dtype: str = "auto"
    device: str = "auto"
    merge_lora: bool = True
    latent: str = "mode"
    seed: int = 0


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


# --- the rows that travel between stages ----------------------------------------------------


@dataclass
class PhotoState:
    """One photo between stages. crops: (F, 512, 512, 3) uint8 RGB; restored: (F, 3, 512, 512)
    float32 in [0, 1] RGB. Pickled into a bytes column: produced and read only by our workers."""

    job: Job
    prepared: Any = None  # model.pipeline.PreparedPhoto, its `crops` emptied for the trip
    crops: np.ndarray | None = None
    restored: np.ndarray | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def face_count(self) -> int:
        return 0 if self.crops is None else int(self.crops.shape[0])


def _pack(state: PhotoState) -> dict[str, bytes]:
    return {"state": pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)}


def _unpack(row: dict[str, Any]) -> PhotoState:
    return pickle.loads(row["state"])


def _set_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


class Prepare:
    """Read, decode, detect and align, on CPU. One detector per actor, loaded once."""

    def __init__(self, config: RunConfig, num_cpus: float) -> None:
        import torch

        from service.state import image_limits, load_detector

        _set_threads(num_cpus)
        self.config = config
        self.limits = image_limits(config.settings)
        aligned = config.options.aligned
        self.detector = None if aligned else load_detector(config.settings, torch.device("cpu"))

    def __call__(self, row: dict[str, Any]) -> dict[str, bytes]:
        from model.pipeline import prepare_photo

        job: Job = pickle.loads(row["job"])
        try:
            data = uris.read_bytes(job.source)
            options = replace(self.config.options, output_format=job.output_format)
            prepared = prepare_photo(data, self.detector, options, self.limits)
        except Exception as exc:
            return _pack(PhotoState(job, error=failure(exc)))
        # Back to the exact uint8 pixels (crops are uint8 / 255): a quarter of the bytes to ship.
        crops = (prepared.crops * 255.0).round().byte().permute(0, 2, 3, 1).numpy()
        prepared.crops = prepared.crops[:0]
        return _pack(PhotoState(job, prepared, crops, timings=dict(prepared.timings)))


class RestoreFaces:
    """One restorer per actor; the faces of a batch of photos in calls of `batch_size` faces."""

    def __init__(self, config: RunConfig, num_cpus: float) -> None:
        from model.device import resolve_device, resolve_dtype
        from model.restorer import OSDFaceRestorer

        _set_threads(num_cpus)
        self.config = config
        device = resolve_device(config.device)
        self.restorer = OSDFaceRestorer.from_pretrained(
            config.settings.weights_dir,
            device,
            resolve_dtype(config.dtype, device),
            merge_lora=config.merge_lora,
            latent=config.latent,
        )
        logger.info("restorer on %s, %s", device, self.restorer.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        states = [pickle.loads(b) for b in batch["state"]]
        todo = [s for s in states if s.error is None and s.face_count]
        if todo:
            try:
                self._restore(todo)
            except Exception:
                for state in todo:  # isolate the photo that fails, keep the others
                    try:
                        self._restore([state])
                    except Exception as exc:
                        state.error = failure(exc)
        return {"state": [_pack(s)["state"] for s in states]}

    def _restore(self, states: list[PhotoState]) -> None:
        import time

        import torch

        crops = torch.from_numpy(np.concatenate([s.crops for s in states]))  # (N, 512, 512, 3)
        crops = crops.permute(0, 3, 1, 2).float().div_(255.0).contiguous()  # as the pipeline
        step = self.config.batch_size
        start = time.perf_counter()
        parts = [
            self.restorer(crops[i : i + step], seed=self.config.seed).images
            for i in range(0, len(crops), step)
        ]
        restored = torch.cat(parts).numpy()  # (N, 3, 512, 512) float32
        share = (time.perf_counter() - start) / len(crops)
        offset = 0
        for state in states:
            n = state.face_count
            state.restored = restored[offset : offset + n]
            state.timings["restore"] = share * n
            offset += n


def finish(row: dict[str, Any]) -> dict[str, str]:
    """Paste back, encode and write one photo (CPU); its report record as JSON."""
    import torch

    from model.pipeline import finish_photo

    state = _unpack(row)
    job = state.job
    if state.error is not None:
        return {"record": Record.failed(job.source, job.target, state.error).to_json()}
    try:
        state.prepared.crops = torch.from_numpy(state.crops).permute(0, 3, 1, 2)
        restored = torch.from_numpy(
            state.restored if state.restored is not None else np.zeros((0, 3, 512, 512), "f4")
        )
        result = finish_photo(state.prepared, restored)
        uris.write_bytes_atomic(job.target, result.data)
    except Exception as exc:
        return {"record": Record.failed(job.source, job.target, failure(exc)).to_json()}
    timings = {**result.timings, "restore": state.timings.get("restore", 0.0)}
    record = Record(job.source, job.target, "restored", [face_json(f) for f in result.faces])
    record.timings = {k: round(v, 6) for k, v in timings.items()}
    return {"record": record.to_json()}


# --- the dataset and the driver ------------------------------------------------------------


@dataclass(frozen=True)
class StageResources:
    """Ray resources per stage, from what the cluster has."""

    prepare_cpus: float
    prepare_actors: tuple[int, int]
    restore: dict[str, float]
    restore_actors: int
    finish_cpus: float


def stage_resources(cluster: dict[str, float]) -> StageResources:
    """GPUs: one restorer actor per GPU, whole CPUs for the rest. CPU only: the restorer takes
    one CPU, and the CPU stages take halves, so on a small machine every stage can run at once
    (whole-CPU actors would hold every CPU and starve the writing tasks)."""
    cpus = max(1.0, float(cluster.get("CPU", 1)))
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return StageResources(1.0, (1, max(1, int(cpus) - gpus)), {"num_gpus": 1}, gpus, 1.0)
    restorers = max(1, int(cpus) // 4)
    return StageResources(0.5, (1, max(1, int(cpus))), {"num_cpus": 1.0}, restorers, 0.5)


def build_dataset(jobs: list[Job], config: RunConfig, res: StageResources):
    """The Ray Data pipeline over `jobs` (lazy; iterate it to run)."""
    import ray.data

    rows = [{"job": pickle.dumps(j)} for j in jobs]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 200))
    ds = ds.map(
        Prepare,
        fn_constructor_kwargs={"config": config, "num_cpus": res.prepare_cpus},
        compute=ray.data.ActorPoolStrategy(
            min_size=res.prepare_actors[0], max_size=res.prepare_actors[1]
        ),
        num_cpus=res.prepare_cpus,
    )
    restore_cpus = res.restore.get("num_cpus", 1.0)
    ds = ds.map_batches(
        RestoreFaces,
        fn_constructor_kwargs={"config": config, "num_cpus": restore_cpus},
        batch_size=config.batch_size,  # photos per call; their faces are cut into model calls
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res.restore_actors),
        **res.restore,
    )
    return ds.map(finish, num_cpus=res.finish_cpus)


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
        for row in build_dataset(jobs, config, res).iter_rows():
            record = Record.from_json(row["record"])
            seen.add(record.input)
            reporter.record(record)
        for job in jobs:  # a row lost by the engine is still reported, as a failure
            if job.source not in seen:
                reporter.record(Record.failed(job.source, job.target, "no result from Ray"))
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
