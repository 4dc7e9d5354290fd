"""Label-free colour baselines a sceptic tries before believing a benchmark's headroom.

Camera normalisation (`common/camera_norm.py`: gains + levels) is the baseline the product
ships and every report carries. A benchmark whose shift it cannot undo may still be undone
by the next statistic a sceptic would match, and twice that has been the case: v2's casts
fell to gray-world, v5's hue turns to a hue-histogram alignment that beat centralised LoRA
(docs/benchmark.md). So the headroom measurement also runs these, all fitted per camera
from that camera's own crops against the neutral source split, no labels, no training:

- `hue_turn`: the turn about the grey axis that best aligns the camera's chroma-weighted
  hue histogram with the source's (circular cross-correlation, 5-degree steps);
- `hue_turn_person`: the same, from the middle of each crop only, where the person is (a
  vivid scene fills the rest and leads the whole-crop histogram astray);
- `colour_moments`: the affine map that gives the camera's pixels the source's colour mean
  and covariance (whitening, then colouring: symmetric square roots).

Each is a `ColourMatch`, a per-camera affine map on RGB that `common.train.ImageBank`
applies like a `CameraNorm`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.datasets import Record
from common.preprocess import load_image
from sims.synth.cameras import turn_about_grey

GREY = np.full(3, 1.0 / np.sqrt(3.0))
_E1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
_E2 = np.cross(GREY, _E1)
HUE_BINS = 72  # 5 degrees
IMAGES_PER_CAMERA = 400
PIXELS_PER_IMAGE = 600


@dataclass(frozen=True)
class ColourMatch:
    """Per camera, x -> A (x - mean) + target on RGB in 0..1 (cameras not listed: unchanged)."""

    maps: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]

    def apply(self, img: Image.Image, camera_id: str) -> Image.Image:
        m = self.maps.get(camera_id)
        if m is None:
            return img
        a, mean, target = m
        x = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
        y = (x - mean) @ a.T + target
        return Image.fromarray(np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8))


def sample_pixels(paths: Sequence[str], *, person: bool = False, seed: int = 0) -> np.ndarray:
    """(n, 3) RGB in 0..1 from up to IMAGES_PER_CAMERA of `paths`; `person`: only the middle
    half of each crop's width and 10-90% of its height."""
    rng = np.random.default_rng(seed)
    paths = sorted(paths)
    pick = rng.choice(len(paths), min(IMAGES_PER_CAMERA, len(paths)), replace=False)
    out = []
    for i in sorted(pick):
        x = np.asarray(load_image(paths[i]).convert("RGB"), dtype=np.float64) / 255.0
        if person:
            h, w = x.shape[:2]
            x = x[h // 10 : h - h // 10, w // 4 : w - w // 4]
        x = x.reshape(-1, 3)
        out.append(x[rng.choice(len(x), min(PIXELS_PER_IMAGE, len(x)), replace=False)])
    return np.concatenate(out)


def hue_histogram(pixels: np.ndarray) -> np.ndarray:
    """Chroma-weighted hue histogram (HUE_BINS bins over the circle), summing to 1."""
    a, b = pixels @ _E1, pixels @ _E2
    hist, _ = np.histogram(np.arctan2(b, a), HUE_BINS, (-np.pi, np.pi), weights=np.hypot(a, b))
    return hist / max(float(hist.sum()), 1e-12)


def hue_turn_estimate(pixels: np.ndarray, source: np.ndarray) -> float:
    """The turn in degrees that takes `source`'s hue histogram onto `pixels`'s."""
    cam, src = hue_histogram(pixels), hue_histogram(source)
    scores = [float(np.dot(np.roll(src, k), cam)) for k in range(HUE_BINS)]
    k = int(np.argmax(scores))
    return float((k * 360.0 / HUE_BINS + 180.0) % 360.0 - 180.0)


def fit_hue_alignment(camera_pixels: Mapping[str, np.ndarray], source: np.ndarray) -> ColourMatch:
    """Per camera, turn its colours back by the turn its hue histogram shows."""
    zero = np.zeros(3)
    return ColourMatch(
        {
            cam: (turn_about_grey(-hue_turn_estimate(px, source)), zero, zero)
            for cam, px in camera_pixels.items()
        }
    )


def _sqrtm(c: np.ndarray, inverse: bool = False) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    w = np.clip(w, 1e-8, None)
    return (v * w ** (-0.5 if inverse else 0.5)) @ v.T


def fit_moment_match(camera_pixels: Mapping[str, np.ndarray], source: np.ndarray) -> ColourMatch:
    """Per camera, the affine map giving its pixels the source's colour mean and covariance."""
    ms, cs = source.mean(0), np.cov(source.T) + 1e-6 * np.eye(3)
    root = _sqrtm(cs)
    return ColourMatch(
        {
            cam: (root @ _sqrtm(np.cov(px.T) + 1e-6 * np.eye(3), inverse=True), px.mean(0), ms)
            for cam, px in camera_pixels.items()
        }
    )


def _paths_by_camera(records: Iterable[Record]) -> dict[str, list[str]]:
    paths: dict[str, set[str]] = {}
    for r in records:
        paths.setdefault(r.camera_id, set()).add(r.image_path)
    return {c: sorted(p) for c, p in paths.items()}


def _source_paths(sources: Iterable[Record]) -> list[str]:
    return sorted({r.image_path for r in sources})


def fit_sceptics(records: Iterable[Record], sources: Iterable[Record]) -> dict[str, ColourMatch]:
    """Every baseline of this module, fitted on each camera's crops of `records` against the
    `sources` crops (the cameras the base model was trained on)."""
    cams, src_paths = _paths_by_camera(records), _source_paths(sources)
    whole = {c: sample_pixels(p) for c, p in cams.items()}
    person = {c: sample_pixels(p, person=True) for c, p in cams.items()}
    src, src_person = sample_pixels(src_paths), sample_pixels(src_paths, person=True)
    return {
        "hue_turn": fit_hue_alignment(whole, src),
        "hue_turn_person": fit_hue_alignment(person, src_person),
        "colour_moments": fit_moment_match(whole, src),
    }


def fit_colour_match(records: Iterable[Record], sources: Iterable[Record]) -> ColourMatch:
    """`colour_moments` alone (what the simulation report carries)."""
    cams = _paths_by_camera(records)
    src = sample_pixels(_source_paths(sources))
    return fit_moment_match({c: sample_pixels(p) for c, p in cams.items()}, src)
