"""The stages of `osdface restore --ray`, run by Ray Data on the cluster's workers.

    Prepare (CPU actors): read the file, decode, detect, align        -> uint8 crops
    RestoreFaces (one restorer per actor; a GPU each, or CPU shares): the faces of several
        photos cut into model calls of `batch_size` faces            -> restored faces
        (with --background, also each photo's upscaled background, on the same device)
    finish (CPU tasks): paste back, encode, write atomically (and --save-faces' crops)
                                                                       -> one report record

The photo functions are the local CLI's and the service's (`model.media.pipeline`). A photo that
fails at any stage carries its error to `finish`, which turns it into a failed record.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from osdface.restore import uris
from osdface.restore.reporting import Record, face_json, reason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    source: str
    target: str
    output_format: str


@dataclass(frozen=True)
class RunConfig:
    """Everything the workers need; plain data, pickled once into each stage."""

    settings: Any  # service.settings.Settings (weights, detector, limits)
    options: Any  # model.options.RestoreOptions, output_format set per job
    batch_size: int  # faces per restorer call
    dtype: str = "auto"
    device: str = "auto"
    merge_lora: bool = True
    latent: str = "mode"
    save_faces: bool = False  # also the aligned and restored crops, in faces/ beside each result
    seed: int | None = None  # None: the deterministic latent (mode)


# --- the rows that travel between stages ----------------------------------------------------


@dataclass
class PhotoState:
    """One photo between stages. crops: (F, 512, 512, 3) uint8 RGB; restored: (F, 3, 512, 512)
    float32 in [0, 1] RGB. Pickled into a bytes column: produced and read only by our workers."""

    job: Job
    prepared: Any = None  # model.media.pipeline.PreparedPhoto, its `crops` emptied for the trip
    crops: np.ndarray | None = None
    restored: np.ndarray | None = None
    background: np.ndarray | None = None  # --background: (H * s, W * s, 3) uint8 RGB
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
        from model.media.pipeline import prepare_photo

        job: Job = pickle.loads(row["job"])
        try:
            data = uris.read_bytes(job.source)
            options = replace(self.config.options, output_format=job.output_format)
            prepared = prepare_photo(data, self.detector, options, self.limits)
        except Exception as exc:
            return _pack(PhotoState(job, error=reason(exc)))
        # Back to the exact uint8 pixels (crops are uint8 / 255): a quarter of the bytes to ship.
        crops = (prepared.crops * 255.0).round().byte().permute(0, 2, 3, 1).numpy()
        prepared.crops = prepared.crops[:0]
        return _pack(PhotoState(job, prepared, crops, timings=dict(prepared.timings)))


class RestoreFaces:
    """One restorer per actor; the faces of a batch of photos in calls of `batch_size` faces."""

    def __init__(self, config: RunConfig, num_cpus: float) -> None:
        from model.device import resolve_device, resolve_dtype
        from model.networks.restorer import OSDFaceRestorer
        from service.state import fast_path_config

        _set_threads(num_cpus)
        self.config = config
        device = resolve_device(config.device)
        self.restorer = OSDFaceRestorer.from_pretrained(
            config.settings.weights_dir,
            device,
            resolve_dtype(config.dtype, device),
            merge_lora=config.merge_lora,
            latent=config.latent,
            fast=fast_path_config(config.settings),  # as the local CLI and the service load it
        )
        from osdface.restore.runners import load_backgrounds

        self.backgrounds = load_backgrounds(
            config.settings.weights_dir, config.options, self.restorer
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
                        state.error = reason(exc)
        if self.backgrounds:  # the photo's network on the same accelerator, photo by photo
            from model.media.pipeline import make_background

            for state in states:
                if state.error is None:
                    try:
                        state.background = make_background(state.prepared, self.backgrounds)
                    except Exception as exc:
                        state.error = reason(exc)
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


def finish(row: dict[str, Any], config: RunConfig) -> dict[str, str]:
    """Paste back, encode and write one photo (CPU); its report record as JSON."""
    import torch

    from model.media.pipeline import finish_photo

    state = _unpack(row)
    job = state.job
    if state.error is not None:
        return {"record": Record(job.source, job.target, "failed", error=state.error).to_json()}
    try:
        state.prepared.crops = torch.from_numpy(state.crops).permute(0, 3, 1, 2)
        restored = torch.from_numpy(
            state.restored if state.restored is not None else np.zeros((0, 3, 512, 512), "f4")
        )
        result = finish_photo(state.prepared, restored, state.background)
        uris.write_bytes_atomic(job.target, result.data)
        if config.save_faces:
            _save_faces(job.target, state.prepared.crops, restored)
    except Exception as exc:
        return {"record": Record(job.source, job.target, "failed", error=reason(exc)).to_json()}
    timings = {**result.timings, "restore": state.timings.get("restore", 0.0)}
    record = Record(job.source, job.target, "restored", [face_json(f) for f in result.faces])
    record.timings = {k: round(v, 6) for k, v in timings.items()}
    return {"record": record.to_json()}


def _save_faces(target: str, crops: Any, restored: Any) -> None:
    from osdface.restore.runners import face_crop_pngs

    folder, _, name = target.rpartition("/")
    for rel, png in face_crop_pngs(name.rpartition(".")[0] or name, crops, restored):
        uris.write_bytes_atomic(f"{folder}/{rel}", png)


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
    return ds.map(finish, fn_kwargs={"config": config}, num_cpus=res.finish_cpus)
