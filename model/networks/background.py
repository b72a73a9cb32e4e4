"""Background super-resolution with Real-ESRGAN, in overlapping tiles so memory is bounded.

The photo is cut into windows of `tile` x `tile` input pixels (fewer when the photo is smaller);
each window covers its *core* plus at least `overlap` pixels of context on every side that is
not the photo's edge. Cores tile the photo exactly. The network runs on `batch` windows at a
time; each upscaled window is resized to the asked output scale (when that differs from the
network's) and only its core is written into the output. Peak memory is therefore the output
canvas plus one batch of windows, whatever the photo's size.

Because windows never cut the photo's edges and Lanczos / area resizing is local, a pixel whose
network receptive field stays inside its window is identical to the untiled result; only pixels
within the receptive field of a window's inner edge can differ (the overlap hides most of it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from model.config import TileConfig
from model.errors import InvalidInputError
from weights.background import BackgroundNet, load_background_net

MAX_ALIGN = 2  # the largest pixel-unshuffle factor of the networks (x2)
MIN_SIDE = 8  # smaller windows (tiny photos) are edge-padded to this, and cropped after


@dataclass(frozen=True)
class TileSettings(TileConfig):
    """`TileConfig`, checked: input pixels per window side, context, windows per call."""

    def __post_init__(self) -> None:
        if self.overlap < 0 or self.batch < 1 or self.tile <= 2 * self.overlap + MAX_ALIGN:
            raise InvalidInputError(
                f"tile settings need tile > 2 * overlap + {MAX_ALIGN}, overlap >= 0 and "
                f"batch >= 1, got {self}"
            )


@dataclass(frozen=True)
class Window:
    """One tile: the core it contributes and the (larger) window it is computed from.

    Both as (start, end) input-pixel ranges along y and x; the core lies inside the window.
    """

    core_y: tuple[int, int]
    core_x: tuple[int, int]
    win_y: tuple[int, int]
    win_x: tuple[int, int]


def axis_windows(
    length: int, tile: int, overlap: int, align: int = 1
) -> list[tuple[int, int, int, int]]:
    """Cut [0, length) into cores; (core_start, core_end, window_start, window_end) each.

    Windows start on multiples of `align` (the network's pixel-unshuffle factor, so every
    window groups pixels as the whole photo would), have exactly `tile` pixels when
    `length >= tile` (so windows batch together; the last may take up to `align - 1` more to
    reach the edge), and reach at least `overlap` pixels past their core except at the edge.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    count = math.ceil(length / (tile - 2 * overlap - (align - 1)))
    bounds = [round(i * length / count) for i in range(count + 1)]
    out = []
    for start, end in itertools.pairwise(bounds):
        win = max(0, min(start - overlap, length - tile))
        win -= win % align
        win_end = length if win + tile > length - align else win + tile
        out.append((start, end, win, win_end))
    return out


def plan_windows(height: int, width: int, tiles: TileSettings, align: int = 1) -> list[Window]:
    """All windows of a `height` x `width` photo, row by row."""
    rows = axis_windows(height, tiles.tile, tiles.overlap, align)
    cols = axis_windows(width, tiles.tile, tiles.overlap, align)
    return [
        Window((y0, y1), (x0, x1), (wy0, wy1), (wx0, wx1))
        for y0, y1, wy0, wy1 in rows
        for x0, x1, wx0, wx1 in cols
    ]


class BackgroundUpscaler:
    """Real-ESRGAN on the restorer's device and dtype; one instance serves every request.

    Holds no per-image state: `__call__` is a pure function of its arguments.
    """

    def __init__(self, net: BackgroundNet, tiles: TileSettings) -> None:
        self.net = net
        self.tiles = tiles
        self.device = next(net.module.parameters()).device
        self.dtype = next(net.module.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        weights_dir: Path | str,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tiles: TileSettings | None = None,
    ) -> BackgroundUpscaler:
        """Load `name` (in `model.config.BACKGROUND_SCALES`) strictly from `weights_dir`."""
        net = load_background_net(Path(weights_dir), name, torch.device(device), dtype)
        return cls(net, tiles or TileSettings())

    @property
    def name(self) -> str:
        return self.net.name

    @property
    def scale(self) -> int:
        return self.net.scale

    def __call__(self, rgb: np.ndarray, scale: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H * scale, W * scale, 3) uint8 RGB, upscaled by the network.

        The network's own scale is resized to `scale` per window (Lanczos up, area down).
        """
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InvalidInputError(f"expected (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
        if not (isinstance(scale, int) and scale >= 1):
            raise InvalidInputError(f"scale must be a positive integer, got {scale}")
        height, width = rgb.shape[:2]
        out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
        windows = plan_windows(height, width, self.tiles, self.net.align)
        for group in _batches(windows, self.tiles.batch):
            for window, upscaled in zip(group, self._run(rgb, group), strict=True):
                _place(out, window, _resize(upscaled, self.scale, scale), scale)
        return out

    @torch.inference_mode()
    def _run(self, rgb: np.ndarray, group: list[Window]) -> np.ndarray:
        """Windows of one size -> (B, h * s, w * s, 3) uint8 at the network's scale `s`."""
        crops = np.stack([rgb[w.win_y[0] : w.win_y[1], w.win_x[0] : w.win_x[1]] for w in group])
        height, width = crops.shape[1:3]
        if min(height, width) < MIN_SIDE:  # the x2 unshuffle's reflect padding needs pixels
            grow = ((0, 0), (0, max(0, MIN_SIDE - height)), (0, max(0, MIN_SIDE - width)), (0, 0))
            crops = np.pad(crops, grow, mode="edge")
        x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2)  # (B, 3, h, w) uint8
        y = self.net.module(x.to(self.dtype).div_(255.0))  # (B, 3, h * s, w * s) in ~[0, 1]
        y = y.float().clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        y = y[:, :, : height * self.scale, : width * self.scale]
        return y.permute(0, 2, 3, 1).cpu().numpy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "scale": self.scale,
            "files": self.net.files,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tile": self.tiles.tile,
            "overlap": self.tiles.overlap,
            "tile_batch": self.tiles.batch,
        }


def _batches(windows: list[Window], size: int) -> Iterator[list[Window]]:
    """Consecutive groups of at most `size` windows of equal shape (needed to stack them)."""
    group: list[Window] = []
    for window in windows:
        if group and (len(group) == size or _shape(group[0]) != _shape(window)):
            yield group
            group = []
        group.append(window)
    if group:
        yield group


def _shape(window: Window) -> tuple[int, int]:
    return window.win_y[1] - window.win_y[0], window.win_x[1] - window.win_x[0]


def _resize(upscaled: np.ndarray, have: int, want: int) -> np.ndarray:
    """A window upscaled by `have` -> the same window at `want` (aligned pixel grids)."""
    if have == want:
        return upscaled
    height, width = (upscaled.shape[0] // have) * want, (upscaled.shape[1] // have) * want
    method = cv2.INTER_LANCZOS4 if want > have else cv2.INTER_AREA
    return cv2.resize(upscaled, (width, height), interpolation=method)


def _place(out: np.ndarray, window: Window, upscaled: np.ndarray, scale: int) -> None:
    """Copy the core of an upscaled window (at `scale`) into `out`."""
    (y0, y1), (x0, x1) = window.core_y, window.core_x
    oy, ox = (y0 - window.win_y[0]) * scale, (x0 - window.win_x[0]) * scale
    out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = upscaled[
        oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale
    ]
