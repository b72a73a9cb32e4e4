"""Who restores the LQ faces for eval: the restorer in this process, or a running service.

Both take and give uint8 (512, 512, 3) RGB arrays, a batch at a time, so eval scores exactly
what a deployment returns (its dtype, fast path and PNG encoding) when it goes through HTTP.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from model.config import Device, DType, LatentMode
from model.errors import InvalidInputError, OSDFaceError

if TYPE_CHECKING:
    from model.networks.restorer import OSDFaceRestorer

logger = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 600.0


class RemoteRestoreError(OSDFaceError):
    """The service answered a restore request with an error."""


class InProcessBackend:
    """OSDFaceRestorer loaded once; one model call per batch."""

    def __init__(self, restorer: OSDFaceRestorer) -> None:
        self.restorer = restorer

    def describe(self) -> dict[str, Any]:
        return {"kind": "in-process", **self.restorer.describe()}

    def restore(self, faces: list[np.ndarray]) -> list[np.ndarray]:
        batch = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 255.0
        out = self.restorer(batch).images  # (B, 3, 512, 512) float32 [0, 1] RGB
        pixels = (out.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        return list(pixels)


class HTTPBackend:
    """POST /restore with aligned=true through `osdface.client`, one request per face, a
    batch's requests concurrently (so the service's cross-request batching sees them together);
    429s, 503s and dropped connections are retried as the client retries them."""

    def __init__(self, url: str, api_key: str | None = None, concurrency: int = 4) -> None:
        from osdface.client import Client, ClientError

        self.concurrency = max(1, concurrency)
        try:
            self.client = Client(
                url, api_key=api_key, deadline_s=HTTP_TIMEOUT_S, max_connections=self.concurrency
            )
        except ClientError as exc:  # a URL without a scheme, an unreadable key file
            raise InvalidInputError(f"--url {url}: {exc}") from exc
        self.url = self.client.url

    def describe(self) -> dict[str, Any]:
        from osdface.client import ClientError, ServiceError

        try:
            info = self.client.info()
        except ServiceError:  # the service answered, without its info: restore anyway
            info = {}
        except ClientError as exc:
            raise RemoteRestoreError(f"{self.url}: {exc}") from exc
        return {"kind": "http", "url": self.url, **info}

    def restore(self, faces: list[np.ndarray]) -> list[np.ndarray]:
        with ThreadPoolExecutor(min(self.concurrency, len(faces))) as pool:
            return list(pool.map(self._one, faces))

    def _one(self, face: np.ndarray) -> np.ndarray:
        from osdface.client import ClientError, RestoreOptions

        buffer = io.BytesIO()
        Image.fromarray(face).save(buffer, format="PNG")
        options = RestoreOptions(aligned=True, output_format="png")
        try:
            result = self.client.restore(buffer.getvalue(), options, filename="face.png")
        except ClientError as exc:
            raise RemoteRestoreError(f"{self.url}/restore: {exc}") from exc
        with Image.open(io.BytesIO(result.image)) as im:
            return np.array(im.convert("RGB"))

    def close(self) -> None:
        self.client.close()


def in_process(
    weights: Path,
    device: Device,
    dtype: DType,
    latent: LatentMode = "mode",
    *,
    fast: bool | None = None,
    batch_size: int = 4,
) -> InProcessBackend:
    """The restorer loaded as `osdface restore` loads it (the run-time settings, OSDFACE_*
    variables included), with the fast path unless `fast` is False."""
    from model.runtime.load import load_restorer
    from model.runtime.settings import RuntimeSettings

    given: dict[str, Any] = {} if fast is None else {"fast_path": fast}
    settings = RuntimeSettings(
        weights_dir=weights,
        device=device,
        dtype=dtype,
        latent=latent,
        max_batch_faces=batch_size,
        **given,
    )
    return InProcessBackend(load_restorer(settings))
