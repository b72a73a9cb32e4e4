"""Exceptions raised by the model package.

`service/errors.py` maps each of these to one HTTP status in one place; nothing in `model/`
knows about HTTP.
"""

from __future__ import annotations


class OSDFaceError(Exception):
    """Base class of every error the model package raises on purpose."""


# --- weights -------------------------------------------------------------------------------


class WeightsError(OSDFaceError):
    """Weights are missing, corrupt or do not match the architecture."""


class WeightsNotFoundError(WeightsError):
    """A weight file the layout requires is absent."""


class ChecksumMismatchError(WeightsError):
    """A file's sha256 differs from the one recorded in the manifest."""


class StateDictMismatchError(WeightsError):
    """A state dict has missing, unexpected or mis-shaped tensors (all of them are named)."""

    def __init__(
        self,
        what: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.what = what
        self.missing = sorted(missing or [])
        self.unexpected = sorted(unexpected or [])
        self.mismatched = sorted(mismatched or [])
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [f"{self.what} does not match the architecture:"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {_clip(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {_clip(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} (file {tuple(f)} vs model {tuple(m)})" for k, f, m in self.mismatched]
            parts.append(f"wrong shape {len(self.mismatched)}: {_clip(shown)}")
        return " ".join(parts)


class LoraKeyError(WeightsError):
    """A LoRA tensor names no UNet module, or its shape does not fit the module."""


class UnsafePickleError(WeightsError):
    """A pickle asked for something other than tensors and plain containers."""


# --- inputs --------------------------------------------------------------------------------


class InvalidInputError(OSDFaceError, ValueError):
    """A tensor or parameter handed to the model is outside its contract."""


class ModelOutputError(OSDFaceError):
    """The model returned what its contract rules out (NaN or infinite pixels): a failure of
    the model or its device, never of the input (which passed its checks before the call)."""


class ImageError(OSDFaceError):
    """Base class for problems with an uploaded image file."""


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image (truncated, corrupt, empty)."""


class UnsupportedFormatError(ImageError):
    """The image format is not on the allow-list."""


class ImageTooLargeError(ImageError):
    """Too many bytes or pixels (decompression-bomb guard), or output over the pixel limit."""


class ImageEncodeError(OSDFaceError):
    """The processed image could not be written in the asked format (a server-side failure)."""


# --- video ---------------------------------------------------------------------------------


class VideoError(OSDFaceError):
    """Base class for problems with a video file; the message names the file."""


class VideoDecodeError(VideoError):
    """The file is not a readable video container, or its stream is truncated or corrupt."""


class NoVideoStreamError(VideoError):
    """The container holds no video stream (audio only, subtitles, data)."""


class UnsupportedVideoCodecError(VideoError):
    """The video stream's codec is not on the allow-list, or this build cannot decode it."""


class VideoEncodeError(OSDFaceError):
    """The restored video could not be written (encoder or muxer failure; server-side)."""


class VideoCancelledError(OSDFaceError):
    """The caller asked the running video restore to stop; nothing was written."""


# --- faces ---------------------------------------------------------------------------------


class DetectorError(OSDFaceError):
    """The face detector could not be loaded or run."""


def _clip(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
