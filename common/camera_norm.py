"""Per-camera colour and levels normalisation: label-free, computed where the images are.

Why it exists: a camera's light (a sodium lamp, a blue LED flood) is mostly a per-channel
gain on every pixel it sees, and its exposure (a dark underpass, a washed-out entrance) a
black and a white point. Gray-world white balance estimates the gain from the camera's own
images (the world averages to grey) and divides it out; levels stretch the camera's typical
darkest and brightest luminance (the mean over its images of each image's 1st and 99th
percentile) to 0..255, as a CCTV auto-levels would. No labels, nothing leaves the node.
It is both a serving option (a node normalises its crops before embedding) and the trivial
baseline every federated figure must beat (docs/benchmark.md): a gain that a per-camera
colour and levels transform explains is not a gain of federated learning.

The statistics are running per-camera sums of per-image statistics (mean RGB, luminance
percentiles), so a node updates them as its gallery grows; `CameraNorm` is the frozen
transform derived from them, with a version string that changes when it changes, so what a
node serves can be named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from common.datasets import Record
from common.preprocess import load_image

# a gain outside this range is a camera that sees (almost) none of a channel: amplifying
# its noise 50x helps nobody, so the correction stops there
MIN_GAIN, MAX_GAIN = 0.25, 4.0
# levels narrower than this (of 255) are a camera that sees almost nothing: left alone
MIN_LEVELS_SPAN = 16.0
LEVEL_PERCENTILES = (1.0, 99.0)
FORMAT = 2  # 1: gains only (mean RGB sums)


def image_stats(img: Image.Image | np.ndarray) -> np.ndarray:
    """One image's statistics, in 0..255: mean R, G, B, then its luminance's 1st and 99th
    percentile (luminance: the mean of the channels)."""
    arr = np.asarray(img, dtype=np.float64)
    mean = image_mean_rgb(arr)
    lo, hi = np.percentile(arr.mean(axis=2), LEVEL_PERCENTILES)
    return np.array([*mean, lo, hi])


def image_mean_rgb(img: Image.Image | np.ndarray) -> np.ndarray:
    """Mean R, G, B of one image in 0..255 (float64)."""
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr.reshape(-1, 3).mean(axis=0)


@dataclass(frozen=True)
class CameraNorm:
    """Frozen per-camera channel gains and (optionally) levels, the (black, white) luminance
    stretched to (0, 255) after the gains; a camera without statistics is left as it is."""

    gains: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)
    levels: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """Short hash of gains (rounded to 1e-3) and levels (to 0.1): equal, equal version.
        Gains alone hash as they did before levels existed."""
        if not self.gains:
            return "none"
        table: dict = {c: [round(g, 3) for g in v] for c, v in sorted(self.gains.items())}
        if self.levels:
            table = {"gains": table, "levels": {
                c: [round(x, 1) for x in v] for c, v in sorted(self.levels.items())
            }}  # fmt: skip
        blob = json.dumps(table, sort_keys=True)
        return "cn-" + hashlib.sha256(blob.encode()).hexdigest()[:10]

    def gain(self, camera_id: str) -> np.ndarray | None:
        g = self.gains.get(camera_id)
        return None if g is None else np.asarray(g, dtype=np.float32)

    def apply(self, img: Image.Image, camera_id: str) -> Image.Image:
        """`img` with its camera's gains and levels applied (the same object when none)."""
        g = self.gain(camera_id)
        if g is None:
            return img
        x = np.asarray(img.convert("RGB"), dtype=np.float32) * g
        levels = self.levels.get(camera_id)
        if levels is not None:
            lo, hi = levels
            x = (x - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))

    def max_change(self, other: CameraNorm) -> float:
        """Largest relative change over cameras either knows (1.0 for a new camera): of a
        gain, or of a black or white point (relative to the full 255)."""
        worst = 0.0
        for cam in set(self.gains) | set(other.gains):
            a, b = self.gain(cam), other.gain(cam)
            if a is None or b is None:
                return 1.0
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(a, b))))
            la, lb = self.levels.get(cam), other.levels.get(cam)
            if (la is None) != (lb is None):
                return 1.0
            if la is not None and lb is not None:
                worst = max(worst, float(np.max(np.abs(np.subtract(la, lb)))) / 255.0)
        return worst

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": self.version,
            "gains": {c: list(v) for c, v in sorted(self.gains.items())},
            "counts": dict(sorted(self.counts.items())),
            "levels": {c: list(v) for c, v in sorted(self.levels.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CameraNorm:
        """Format 1 (gains only, before levels existed) reads as gains without levels."""
        if data.get("format") not in (1, FORMAT):
            raise ValueError(f"camera normalisation format {data.get('format')!r}, need {FORMAT}")
        gains = {}
        for cam, g in data.get("gains", {}).items():
            values = tuple(float(x) for x in g)
            if len(values) != 3 or not all(MIN_GAIN <= x <= MAX_GAIN for x in values):
                raise ValueError(f"camera {cam!r}: gains must be 3 values in "
                                 f"[{MIN_GAIN}, {MAX_GAIN}], got {list(g)}")  # fmt: skip
            gains[str(cam)] = values
        counts = {str(c): int(n) for c, n in data.get("counts", {}).items()}
        levels = {}
        for cam, v in data.get("levels", {}).items():
            values = [float(x) for x in v]
            if not (len(values) == 2 and cam in gains and values[0] >= 0 and values[1] <= 255
                    and values[1] - values[0] >= MIN_LEVELS_SPAN):  # fmt: skip
                raise ValueError(f"camera {cam!r}: levels must be 0 <= black < white <= 255, "
                                 f"at least {MIN_LEVELS_SPAN:g} apart, for a camera with "
                                 f"gains, got {list(v)}")  # fmt: skip
            lo, hi = values
            levels[str(cam)] = (lo, hi)
        return cls(gains, counts, levels)


@dataclass
class CameraStats:
    """Running per-camera sums of `image_stats`; `norm()` turns them into gains + levels."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, camera_id: str, stats: np.ndarray) -> None:
        """Count one image's `image_stats` (5 values)."""
        stats = np.asarray(stats, dtype=np.float64)
        if stats.shape != (5,):
            raise ValueError(f"expected 5 image statistics (image_stats), got {stats.shape}")
        self.sums[camera_id] = self.sums.get(camera_id, np.zeros(5)) + stats
        self.counts[camera_id] = self.counts.get(camera_id, 0) + 1

    def add_image(self, camera_id: str, img: Image.Image | np.ndarray) -> None:
        self.add(camera_id, image_stats(img))

    def norm(self, min_images: int = 1, *, levels: bool = True) -> CameraNorm:
        """Gray-world gains, mean(all channels) / mean(channel), and (with `levels`) the mean
        black and white points, for every camera with at least `min_images` images (fewer:
        too little to tell the light from the content)."""
        gains, counts, points = {}, {}, {}
        for cam, total in sorted(self.sums.items()):
            n = self.counts[cam]
            if n < max(1, min_images):
                continue
            mean = total / n
            g = np.clip(mean[:3].mean() / np.maximum(mean[:3], 1e-6), MIN_GAIN, MAX_GAIN)
            gains[cam] = tuple(round(float(x), 6) for x in g)
            counts[cam] = n
            lo, hi = float(np.clip(mean[3], 0, 255)), float(np.clip(mean[4], 0, 255))
            if levels and hi - lo >= MIN_LEVELS_SPAN:
                points[cam] = (round(lo, 3), round(hi, 3))
        return CameraNorm(gains, counts, points)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "sums": {c: v.tolist() for c, v in sorted(self.sums.items())},
            "counts": dict(sorted(self.counts.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CameraStats:
        if data.get("format") != FORMAT:
            raise ValueError(f"camera statistics format {data.get('format')!r}, need {FORMAT}")
        sums = {str(c): np.asarray(v, dtype=np.float64) for c, v in data.get("sums", {}).items()}
        counts = {str(c): int(n) for c, n in data.get("counts", {}).items()}
        if set(sums) != set(counts) or any(v.shape != (5,) for v in sums.values()):
            raise ValueError("camera statistics: sums and counts do not match")
        return cls(sums, counts)


def fit_camera_norm(
    images: Iterable[tuple[str, Image.Image | np.ndarray]],
    min_images: int = 1,
    *,
    levels: bool = True,
) -> CameraNorm:
    """Gains (+ levels) from (camera_id, image) pairs: what a node computes over its gallery."""
    stats = CameraStats()
    for camera_id, img in images:
        stats.add_image(camera_id, img)
    return stats.norm(min_images, levels=levels)


def gallery_camera_norm(
    records: Iterable[Record], min_images: int = 1, *, levels: bool = True
) -> CameraNorm:
    """Per camera from a gallery's own images (no labels): what each node computes over its
    gallery, here over a record list at once (each camera belongs to one node)."""
    images = {r.image_path: r.camera_id for r in records}
    return fit_camera_norm(
        ((cam, load_image(path)) for path, cam in sorted(images.items())),
        min_images,
        levels=levels,
    )
