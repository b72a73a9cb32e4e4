"""The stages of `osdface restore --ray`, run by Ray Data on the cluster's workers.

    Prepare (CPU actors): read the file, decode, detect, align        -> uint8 crops
    RestoreFaces (one restorer per actor; a GPU each, or CPU shares): the faces of several
        photos cut into model calls of `batch_size` faces            -> restored faces
        (with --background, also each photo's upscaled background, on the same device)
    finish (CPU tasks): paste back, encode, write atomically (and --save-faces' crops)
                                                                       -> one report record

The photo functions are the local CLI's and the service's (`model.media.pipeline`,
`model.media.batch`), loaded through the same `model.runtime.load`. A photo that fails at any
stage carries its error to `finish`, which turns it into a failed record. Neither this module
nor what its stages import is the HTTP service's.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from osdface.restore import uris
from osdface.restore.config import RunConfig
from osdface.restore.plan import Job
from osdface.restore.reporting import Record, face_json, reason

logger = logging.getLogger(__name__)


# --- the rows that travel between stages ----------------------------------------------------


@dataclass
class PhotoState:
    """One photo between stages. crops: (F, 512, 512, 3) uint8 RGB; restored: (F, 3, 512, 512)
    float32 in [0, 1] RGB. Pickled into a bytes column: produced and read only by our workers.
    The job's source and target are strings (paths or URIs)."""

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

        from model.runtime.load import image_limits, load_detector

        _set_threads(num_cpus)
        self.config = config
        self.limits = image_limits(config.settings)
        aligned = config.options.aligned
        self.detector = None if aligned else load_detector(config.settings, torch.device("cpu"))

    def __call__(self, row: dict[str, Any]) -> dict[str, bytes]:
        from model.image_processor import tensor_to_pixels
        from model.media.pipeline import prepare_photo

        job: Job = pickle.loads(row["job"])
        try:
            data = uris.read_bytes(str(job.source))
            options = replace(self.config.options, output_format=job.output_format)
            prepared = prepare_photo(data, self.detector, options, self.limits)
        except Exception as exc:
            return _pack(PhotoState(job, error=reason(exc)))
        # Back to the exact uint8 pixels (crops are uint8 / 255): a quarter of the bytes to ship.
        crops = tensor_to_pixels(prepared.crops)
        prepared.crops = prepared.crops[:0]
        return _pack(PhotoState(job, prepared, crops, timings=dict(prepared.timings)))


class RestoreFaces:
    """One restorer per actor; the faces of a batch of photos in calls of `batch_size` faces."""

    def __init__(self, config: RunConfig, num_cpus: float) -> None:
        from model.runtime.load import load_backgrounds, load_restorer

        _set_threads(num_cpus)
        self.config = config
        # As the local CLI and the service load them: the settings' fast path and tiles.
        self.restorer = load_restorer(config.settings, merge_lora=config.merge_lora)
        device, dtype = self.restorer.device, self.restorer.dtype
        self.backgrounds = load_backgrounds(config.settings, config.backgrounds, device, dtype)
        logger.info("restorer on %s, %s", device, dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        states = [pickle.loads(b) for b in batch["state"]]
        todo = [s for s in states if s.error is None and s.face_count]
        if todo:
            self._restore(todo)
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
        """The photos' faces in shared calls; a photo that fails them alone gets the error."""
        from model.image_processor import pixels_to_tensor
        from model.media.batch import restore_photos

        crops = [pixels_to_tensor(s.crops) for s in states if s.crops is not None]
        assert len(crops) == len(states)  # (F, 3, 512, 512) each: only photos with faces come
        config = self.config
        results = restore_photos(
            self.restorer, crops, batch_size=config.batch_size, seed=config.seed
        )
        for state, faces in zip(states, results, strict=True):
            if faces.error is not None:
                state.error = reason(faces.error)
                continue
            assert faces.faces is not None
            state.restored = faces.faces.float().cpu().numpy()  # (F, 3, 512, 512) float32
            state.timings["restore"] = faces.seconds


def finish(row: dict[str, Any], config: RunConfig) -> dict[str, str]:
    """Paste back, encode and write one photo (CPU); its report record as JSON."""
    import torch

    from model.media.pipeline import finish_photo

    state = _unpack(row)
    job = state.job
    source, target = job.name, str(job.target)
    if state.error is not None:
        return {"record": Record(source, target, "failed", error=state.error).to_json()}
    try:
        state.prepared.crops = torch.from_numpy(state.crops).permute(0, 3, 1, 2)
        restored = torch.from_numpy(
            state.restored if state.restored is not None else np.zeros((0, 3, 512, 512), "f4")
        )
        result = finish_photo(state.prepared, restored, state.background)
        uris.write_bytes_atomic(target, result.data)
        if config.save_faces:
            _save_faces(target, state.prepared.crops, restored)
    except Exception as exc:
        return {"record": Record(source, target, "failed", error=reason(exc)).to_json()}
    timings = {**result.timings, "restore": state.timings.get("restore", 0.0)}
    record = Record(source, target, "restored", [face_json(f) for f in result.faces])
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


def build_dataset(jobs: list[Job], config: RunConfig, res: StageResources) -> Any:
    """The Ray Data pipeline over `jobs` (a lazy `ray.data.Dataset`; iterate it to run)."""
    import ray.data

    rows = [{"job": pickle.dumps(j)} for j in jobs]
    # Any: Ray Data's stubs type `map` for plain functions, not for our stage classes.
    ds: Any = ray.data.from_items(rows, override_num_blocks=min(len(rows), 200))
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
