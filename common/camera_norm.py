"""Per-camera gray-world colour normalisation: label-free, computed where the images are.

Why it exists: a camera's light (a sodium lamp, a blue LED flood) is mostly a per-channel
gain on every pixel it sees. Gray-world white balance estimates that gain from the camera's
own images (the world averages to grey) and divides it out, with no labels and nothing
leaving the node. It is both a serving option (a node normalises its crops before embedding)
and the trivial baseline every federated figure must beat (docs/benchmark.md): a gain that a
per-camera diagonal colour transform explains is not a gain of federated learning.

The statistics are running per-camera sums of mean RGB, so a node updates them as its
gallery grows; `CameraNorm` is the frozen gains derived from them, with a version string
that changes when the gains change, so what a node serves can be named.
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
FORMAT = 1


def image_mean_rgb(img: Image.Image | np.ndarray) -> np.ndarray:
    """Mean R, G, B of one image in 0..255 (float64)."""
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr.reshape(-1, 3).mean(axis=0)


@dataclass(frozen=True)
class CameraNorm:
    """Frozen per-camera channel gains; a camera it has no statistics for is left as it is."""

    gains: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """Short hash of the gains (rounded to 1e-3): equal gains, equal version."""
        if not self.gains:
            return "none"
        blob = json.dumps(
            {c: [round(g, 3) for g in v] for c, v in sorted(self.gains.items())}, sort_keys=True
        )
        return "cn-" + hashlib.sha256(blob.encode()).hexdigest()[:10]

    def gain(self, camera_id: str) -> np.ndarray | None:
        g = self.gains.get(camera_id)
        return None if g is None else np.asarray(g, dtype=np.float32)

    def apply(self, img: Image.Image, camera_id: str) -> Image.Image:
        """`img` with its camera's gains applied (the same object when there are none)."""
        g = self.gain(camera_id)
        if g is None:
            return img
        x = np.asarray(img.convert("RGB"), dtype=np.float32) * g
        return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))

    def max_change(self, other: CameraNorm) -> float:
        """Largest relative gain difference over cameras either knows (1.0 for a new camera)."""
        worst = 0.0
        for cam in set(self.gains) | set(other.gains):
            a, b = self.gain(cam), other.gain(cam)
            if a is None or b is None:
                return 1.0
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(a, b))))
        return worst

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": self.version,
            "gains": {c: list(v) for c, v in sorted(self.gains.items())},
            "counts": dict(sorted(self.counts.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CameraNorm:
        if data.get("format") != FORMAT:
            raise ValueError(f"camera normalisation format {data.get('format')!r}, need {FORMAT}")
        gains = {}
        for cam, g in data.get("gains", {}).items():
            values = tuple(float(x) for x in g)
            if len(values) != 3 or not all(MIN_GAIN <= x <= MAX_GAIN for x in values):
                raise ValueError(f"camera {cam!r}: gains must be 3 values in "
                                 f"[{MIN_GAIN}, {MAX_GAIN}], got {list(g)}")  # fmt: skip
            gains[str(cam)] = values
        counts = {str(c): int(n) for c, n in data.get("counts", {}).items()}
        return cls(gains, counts)


@dataclass
class CameraStats:
    """Running per-camera sums of image mean RGB; `norm()` turns them into gains."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, camera_id: str, mean_rgb: np.ndarray) -> None:
        self.sums[camera_id] = self.sums.get(camera_id, np.zeros(3)) + np.asarray(mean_rgb)
        self.counts[camera_id] = self.counts.get(camera_id, 0) + 1

    def add_image(self, camera_id: str, img: Image.Image | np.ndarray) -> None:
        self.add(camera_id, image_mean_rgb(img))

    def norm(self, min_images: int = 1) -> CameraNorm:
        """Gray-world gains, mean(all channels) / mean(channel), for every camera with at
        least `min_images` images (fewer: too little to tell the light from the content)."""
        gains, counts = {}, {}
        for cam, total in sorted(self.sums.items()):
            n = self.counts[cam]
            if n < max(1, min_images):
                continue
            mean = total / n
            g = np.clip(mean.mean() / np.maximum(mean, 1e-6), MIN_GAIN, MAX_GAIN)
            gains[cam] = tuple(round(float(x), 6) for x in g)
            counts[cam] = n
        return CameraNorm(gains, counts)

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
        if set(sums) != set(counts) or any(v.shape != (3,) for v in sums.values()):
            raise ValueError("camera statistics: sums and counts do not match")
        return cls(sums, counts)


def fit_camera_norm(
    images: Iterable[tuple[str, Image.Image | np.ndarray]], min_images: int = 1
) -> CameraNorm:
    """Gains from (camera_id, image) pairs: what a node computes over its own gallery."""
    stats = CameraStats()
    for camera_id, img in images:
        stats.add_image(camera_id, img)
    return stats.norm(min_images)


def gallery_camera_norm(records: Iterable[Record], min_images: int = 1) -> CameraNorm:
    """Gains per camera from a gallery's own images (no labels): what each node computes over
    its gallery, here over a record list at once (each camera belongs to one node)."""
    images = {r.image_path: r.camera_id for r in records}
    return fit_camera_norm(
        ((cam, load_image(path)) for path, cam in sorted(images.items())), min_images
    )
