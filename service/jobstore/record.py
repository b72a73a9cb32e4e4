"""One video job as the job store holds it: a plain record, JSON-able, shared by every replica.

The record is data only: no paths (a replica finds the files at `<jobs_dir>/<id>/`), no events,
no objects. Two encodings round-trip exactly: a JSON object (`to_json`/`from_json`, the SQLite
backend) and a flat map of strings (`to_fields`/`from_fields`, a Redis hash: None is an absent
field). Both ignore unknown keys and fill missing ones with defaults, so replicas of two versions
can share one store during a rolling deploy.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# What the job's runner reports while it holds the lease (`JobStore.progress`, `finish`).
PROGRESS_FIELDS = frozenset(
    {
        "frames_done",
        "frames_total",
        "fps",
        "eta_s",
        "faces",
        "segments_done",
        "segments_total",
        "segments_redone",
    }
)


@dataclass
class JobRecord:
    """One video job.

    `filename` is the client's name for its upload, for messages only (never a path); `suffix`
    (".mp4") names the files `input<suffix>` and `output<suffix>` in the job's folder.
    `owner` and `lease_until` (seconds since the epoch) are set while a replica runs the job;
    `takeovers` counts the claims of this job after its lease had expired, `segments_redone` the
    segments its runners wrote twice.
    """

    id: str
    filename: str = ""
    suffix: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    frames_done: int = 0
    frames_total: int | None = None
    fps: float = 0.0
    eta_s: float | None = None
    faces: int = 0
    error: dict[str, str] | None = None
    idempotency_key: str | None = None
    upload_digest: str | None = None
    segments_done: int = 0
    segments_total: int | None = None
    owner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    takeovers: int = 0
    segments_redone: int = 0
    # W3C trace headers of the submitting request (service.tracing_worker.carrier), so the
    # job's trace links to it on whichever replica runs it; None while tracing is off.
    trace: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not JOB_ID.match(self.id):
            raise ValueError(f"a job id is 32 lowercase hex digits, not {self.id!r}")
        self.state = JobState(self.state)

    @classmethod
    def new(cls, filename: str, suffix: str, options: dict[str, Any], **fields: Any) -> JobRecord:
        """A queued job with a fresh random id, created now."""
        return cls(uuid.uuid4().hex, filename, suffix, options, **fields)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    # --- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = str(self.state)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        """The record of `data`; unknown keys are ignored, missing ones take their defaults."""
        known = {k: v for k, v in data.items() if k in _FIELD_NAMES}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls.from_dict(json.loads(text))

    # --- flat string map (a Redis hash) ------------------------------------------------------

    def to_fields(self) -> dict[str, str]:
        """Every field that is not None, as a string (floats by repr: exact round trip)."""
        return {
            name: encode_field(name, value)
            for name, value in self.to_dict().items()
            if value is not None
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> JobRecord:
        return cls.from_dict(
            {name: decode_field(name, text) for name, text in fields.items() if name in _KINDS}
        )


def replica_id() -> str:
    """An owner name unique to this process: host (the pod's name under Kubernetes), pid and
    a random part, so a restarted process never mistakes its predecessor's lease for its own."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def encode_field(name: str, value: Any) -> str:
    """One field's value as the string `to_fields` stores."""
    kind = _KINDS[name]
    if kind is dict:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    if kind is bool:
        return "1" if value else "0"
    if kind is float:
        return repr(float(value))
    return str(value)


def decode_field(name: str, text: str) -> Any:
    kind = _KINDS[name]
    if kind is dict:
        return json.loads(text)
    if kind is bool:
        return text == "1"
    if kind is int:
        return int(float(text))  # a Lua script may have written "3.0"
    return kind(text)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(JobRecord))
_INTS = {"frames_done", "frames_total", "faces", "segments_done", "segments_total"}
_INTS |= {"takeovers", "segments_redone"}
_FLOATS = {"created_at", "started_at", "finished_at", "fps", "eta_s", "lease_until"}
_KINDS: dict[str, type] = {
    **{name: str for name in _FIELD_NAMES},
    **{name: int for name in _INTS},
    **{name: float for name in _FLOATS},
    "options": dict,
    "error": dict,
    "trace": dict,
    "cancel_requested": bool,
}
