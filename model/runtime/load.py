"""The run-time settings turned into objects: limits, detector, fast path, restorer, background
networks. The service, `osdface restore` and its Ray workers load through these, so the same
settings load the same model everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from model.config import DetectorConfig
from model.device import resolve_device, resolve_dtype
from model.media.codecs.formats import ImageLimits
from model.media.faces.detect import FaceDetector
from model.networks.background import BackgroundUpscaler, TileSettings
from model.networks.fastpath import FastPathConfig, batch_sizes_up_to
from model.networks.restorer import OSDFaceRestorer
from model.runtime.settings import RuntimeSettings

logger = logging.getLogger(__name__)


def image_limits(s: RuntimeSettings) -> ImageLimits:
    return ImageLimits(
        max_bytes=s.max_upload_bytes,
        max_pixels=s.max_pixels,
        max_output_pixels=s.max_output_pixels,
        allowed_formats=tuple(s.allowed_formats),
    )


def detector_config(s: RuntimeSettings) -> DetectorConfig:
    return DetectorConfig(
        name=s.detector,
        threshold=s.detect_threshold,
        max_side=s.detect_max_side,
        min_face_size=s.min_face_size,
    )


def load_detector(s: RuntimeSettings, device: torch.device) -> FaceDetector:
    """The face detector the settings name, from `<weights_dir>/facexlib/`."""
    return FaceDetector.from_config(s.weights_dir, detector_config(s), device)


def fast_path_config(s: RuntimeSettings) -> FastPathConfig | None:
    """The restorer's fast path from the settings (None: the plain path).

    CUDA graphs / compiled shapes are made for the batch sizes model calls mostly have,
    1, 2, 4, ... up to `max_batch_faces`; other sizes pad up to the next one or split.
    """
    if not s.fast_path:
        if s.torch_threads is not None:
            torch.set_num_threads(s.torch_threads)  # process-wide, as the fast path does
        return None
    return FastPathConfig(
        channels_last=s.channels_last,
        cuda_graphs=s.cuda_graphs,
        compile=s.compile,
        compile_mode=s.compile_mode,
        batch_sizes=batch_sizes_up_to(s.max_batch_faces),
        num_threads=s.torch_threads,
    )


def load_restorer(
    s: RuntimeSettings, device: torch.device | None = None, *, merge_lora: bool = True
) -> OSDFaceRestorer:
    """The restorer on `device` (default: the settings'), in the settings' dtype and fast path."""
    device = device if device is not None else resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    logger.info("loading the restorer from %s on %s (%s)", s.weights_dir, device, dtype)
    return OSDFaceRestorer.from_pretrained(
        s.weights_dir,
        device,
        dtype,
        merge_lora=merge_lora,
        latent=s.latent,
        fast=fast_path_config(s),
    )


def tile_settings(s: RuntimeSettings) -> TileSettings:
    return TileSettings(s.background_tile, s.background_tile_overlap, s.background_tile_batch)


def load_backgrounds(
    s: RuntimeSettings, names: Iterable[str], device: torch.device, dtype: torch.dtype
) -> dict[str, BackgroundUpscaler]:
    """The named Real-ESRGAN networks, strictly loaded from `<weights_dir>/realesrgan/`, with
    the settings' tiles. Callers put them on the restorer's device and dtype, so that the two
    share the accelerator."""
    loaded = {}
    for name in dict.fromkeys(names):
        logger.info("loading the %s background network on %s (%s)", name, device, dtype)
        loaded[name] = BackgroundUpscaler.from_pretrained(
            s.weights_dir, name, device, dtype, tile_settings(s)
        )
    return loaded
