"""A typed client of the OSDFace service, blocking (`Client`) and asyncio (`AsyncClient`).

    from osdface.client import Client, RestoreOptions

    with Client("http://gpu-box:8000") as client:
        result = client.restore("photo.jpg", RestoreOptions(strength=0.7))
        result.save("photo-restored.jpg")
        print(result.faces_restored, result.timings.total_s)

It imports httpx and nothing of the service, FastAPI or torch: it is what a laptop runs.
What is retried and how long it waits: `osdface.client.retry`; the errors it raises:
`osdface.client.errors`; the HTTP API itself: docs/api.md.
"""

import importlib.util

if importlib.util.find_spec("httpx") is None:  # `make venv` installs what serving needs only
    raise ModuleNotFoundError(
        "osdface.client needs httpx: pip install -e '.[client]' (or `make dev`)", name="httpx"
    )

from osdface.client.aio import AsyncClient
from osdface.client.errors import (
    AuthError,
    BusyError,
    ClientError,
    ConfigError,
    DeadlineExceededError,
    InputError,
    JobFailedError,
    JobNotDoneError,
    NotFoundError,
    ServerError,
    ServiceError,
    TLSError,
    UnreachableError,
)
from osdface.client.models import (
    Face,
    Job,
    JobOptions,
    JobProgress,
    RestoreOptions,
    RestoreResult,
    Timings,
)
from osdface.client.retry import RetryPolicy
from osdface.client.sync import Client

__all__ = [
    "AsyncClient",
    "AuthError",
    "BusyError",
    "Client",
    "ClientError",
    "ConfigError",
    "DeadlineExceededError",
    "Face",
    "InputError",
    "Job",
    "JobFailedError",
    "JobNotDoneError",
    "JobOptions",
    "JobProgress",
    "NotFoundError",
    "RestoreOptions",
    "RestoreResult",
    "RetryPolicy",
    "ServerError",
    "ServiceError",
    "TLSError",
    "Timings",
    "UnreachableError",
]
