"""One run of `osdface restore`, decided once from its flags (osdface/restore/command.py).

The runners, the video path, the Ray driver and the Ray workers read this frozen value, never
the parsed flags. Plain data, free of torch: it is pickled once into each Ray stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.options import RestoreOptions
from model.runtime.settings import RuntimeSettings
from osdface.restore.remote import RemoteFlags
from osdface.restore.video import VideoFlags

DEFAULT_OUTPUT = "results"


@dataclass(frozen=True)
class RunConfig:
    """The settings (flags over OSDFACE_* over defaults), the options every photo gets, and
    what the run does with its inputs and outputs."""

    settings: RuntimeSettings
    options: RestoreOptions  # validated; output_format is set per job
    inputs: tuple[str, ...] = ()  # files, folders, globs, URIs (--ray), or "-"
    output: str = DEFAULT_OUTPUT  # a folder, or with --ray a URI
    recursive: bool = False
    suffix: str = ""
    overwrite: bool = False
    report: Path | None = None
    save_faces: bool = False  # also the aligned and restored crops, in faces/ beside each result
    compare: bool = False  # also input | restored side by side, in compare/ beside each result
    merge_lora: bool = True
    quiet: bool = False
    ray: bool = False
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local cluster
    ray_cpus: int | None = None  # CPUs of a local cluster
    video: VideoFlags | None = None  # the checked video flags, when the run has videos
    remote: RemoteFlags | None = None  # --url: the service that does the work
    weights_id: str | None = None  # the weights' id when a service holds them; None: weights_dir's

    @property
    def batch_size(self) -> int:
        """Faces per model call."""
        return self.settings.max_batch_faces

    @property
    def seed(self) -> int | None:
        return self.settings.restorer_seed

    @property
    def backgrounds(self) -> tuple[str, ...]:
        """The background network the options ask for (none for a Lanczos resize)."""
        return () if self.options.background == "none" else (self.options.background,)
