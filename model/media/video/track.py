"""Faces followed across frames (box IoU) and their landmarks smoothed per track.

A detector's landmarks jitter by a pixel or two from frame to frame even on a still face; the
aligned crop, and so the restored face, would shimmer. Each track runs a one-euro filter
(Casiez, Roussel and Vogel, CHI 2012) on its five landmarks: a low cut-off while the face is
still, rising with its speed so a moving face is followed without lag. A dead band then holds
the output exactly still while the filtered points stay within a small fraction of the face's
size of where they were, so the crop of a still face does not move at all.

Points are (x, y) pixels; time is counted in frames. Speeds and the dead band are relative to
the face's size, so the same settings fit small and large faces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model.media.faces.detect import DetectedFace


@dataclass(frozen=True)
class SmoothingConfig:
    """One-euro parameters in frames and face sizes; `enabled=False` passes landmarks through."""

    enabled: bool = True
    min_cutoff: float = 0.02  # cycles per frame while still (0.6 Hz at 30 fps)
    beta: float = 10.0  # cut-off rise per (face size per frame) of speed
    d_cutoff: float = 0.1  # cycles per frame for the speed estimate
    dead_band: float = 0.01  # fraction of the face size under which the output holds still
    iou_threshold: float = 0.3  # a detection continues a track when the boxes overlap this much
    max_missed: int = 5  # frames a track survives without a detection


def _alpha(cutoff: float) -> float:
    """Smoothing factor of a first-order low-pass at `cutoff` cycles per frame (dt = 1 frame)."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau)


class OneEuroFilter:
    """One-euro filter over an array of points; `scale` normalises speeds (the face size)."""

    def __init__(self, config: SmoothingConfig) -> None:
        self.config = config
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None
        self._held: np.ndarray | None = None

    def __call__(self, points: np.ndarray, scale: float) -> np.ndarray:
        c = self.config
        points = np.asarray(points, np.float64)
        if self._value is None or self._speed is None or self._held is None:  # set together
            self._value, self._speed, self._held = points.copy(), np.zeros_like(points), points
            return points.copy()
        speed = (points - self._value) / max(scale, 1e-6)  # face sizes per frame
        a_d = _alpha(c.d_cutoff)
        self._speed = a_d * speed + (1 - a_d) * self._speed
        cutoff = c.min_cutoff + c.beta * np.abs(self._speed)
        a = 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff))
        self._value = a * points + (1 - a) * self._value
        if np.abs(self._value - self._held).max() > c.dead_band * scale:
            self._held = self._value.copy()
        return self._held.copy()


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    """A face followed across frames: its id, last box, filter and frames since last seen."""

    id: int
    box: tuple[float, float, float, float]
    filter: OneEuroFilter
    missed: int = 0
    length: int = field(default=0)


@dataclass(frozen=True)
class TrackedFace:
    """A detection in one frame, its track id, and the smoothed (5, 2) landmarks to align with."""

    track_id: int
    face: DetectedFace
    landmarks: np.ndarray


class FaceTracker:
    """Greedy IoU association of each frame's detections to the live tracks, then smoothing.

    One tracker per video (it holds that video's tracks); not shared between videos or threads.
    """

    def __init__(self, config: SmoothingConfig | None = None) -> None:
        self.config = config or SmoothingConfig()
        self.tracks: list[Track] = []
        self._next_id = 0

    def update(self, faces: list[DetectedFace]) -> list[TrackedFace]:
        """Associate this frame's faces with tracks; the faces in their given order."""
        pairs = self._match(faces)
        out = []
        for index, face in enumerate(faces):
            track = pairs.get(index) or self._new_track(face)
            track.box, track.missed = face.box, 0
            track.length += 1
            out.append(TrackedFace(track.id, face, self._smooth(track, face)))
        seen = {t.track_id for t in out}
        for track in self.tracks:
            if track.id not in seen:
                track.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.config.max_missed]
        return out

    def _match(self, faces: list[DetectedFace]) -> dict[int, Track]:
        candidates = [
            (box_iou(track.box, face.box), ti, fi)
            for ti, track in enumerate(self.tracks)
            for fi, face in enumerate(faces)
        ]
        candidates.sort(reverse=True)
        used_tracks: set[int] = set()
        pairs: dict[int, Track] = {}
        for iou, ti, fi in candidates:
            if iou < self.config.iou_threshold:
                break
            if ti in used_tracks or fi in pairs:
                continue
            used_tracks.add(ti)
            pairs[fi] = self.tracks[ti]
        return pairs

    def _new_track(self, face: DetectedFace) -> Track:
        track = Track(self._next_id, face.box, OneEuroFilter(self.config))
        self._next_id += 1
        self.tracks.append(track)
        return track

    def _smooth(self, track: Track, face: DetectedFace) -> np.ndarray:
        points = face.landmarks_array()  # (5, 2)
        if not self.config.enabled:
            return points
        x1, y1, x2, y2 = face.box
        scale = math.sqrt(max(x2 - x1, 1.0) * max(y2 - y1, 1.0))
        return track.filter(points, scale)
