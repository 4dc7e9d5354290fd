"""Camera normalisation: undoes a per-camera gain and exposure, persists, versions, refuses junk."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.camera_norm import CameraNorm, CameraStats, fit_camera_norm


def _scenes(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(40, 200, size=(32, 16, 3)).astype(np.float32) for _ in range(n)]


def _lit(scene: np.ndarray, cast) -> Image.Image:
    return Image.fromarray(np.clip(scene * np.asarray(cast), 0, 255).astype(np.uint8))


def test_a_coloured_light_is_divided_out_and_a_neutral_camera_left_alone():
    scenes = _scenes(40)
    cast = (1.0, 0.6, 0.3)  # sodium-like: blue almost gone
    pairs = [("c01", _lit(s, cast)) for s in scenes] + [("c02", _lit(s, (1, 1, 1))) for s in scenes]
    norm = fit_camera_norm(pairs)
    g1, g2 = norm.gain("c01"), norm.gain("c02")
    assert g1[2] > 2.5 * g1[0]  # blue lifted most
    assert np.allclose(g2, 1.0, atol=0.05)
    fixed = np.asarray(norm.apply(pairs[0][1], "c01"), np.float32)
    means = fixed.reshape(-1, 3).mean(0)
    assert means.max() / means.min() < 1.25  # the cast is gone (was ~3.3x)
    unknown = pairs[0][1]
    assert norm.apply(unknown, "c99") is unknown


def test_running_statistics_equal_a_fit_over_everything_and_round_trip():
    pairs = [(f"c0{i % 3}", _lit(s, (1, 0.8, 0.5))) for i, s in enumerate(_scenes(30, 1))]
    stats = CameraStats()
    for cam, img in pairs[:10]:
        stats.add_image(cam, img)
    early = stats.norm()
    for cam, img in pairs[10:]:
        stats.add_image(cam, img)
    assert stats.norm() == fit_camera_norm(pairs)
    assert CameraStats.from_dict(stats.to_dict()).norm() == stats.norm()
    norm = stats.norm()
    assert CameraNorm.from_dict(norm.to_dict()) == norm
    assert (
        norm.version.startswith("cn-")
        and norm.version == CameraNorm.from_dict(norm.to_dict()).version
    )
    assert early.version != norm.version or early.max_change(norm) < 1e-3
    assert CameraNorm().version == "none"


def test_min_images_holds_back_a_camera_with_too_few_crops():
    pairs = [("c01", _lit(s, (1, 1, 0.5))) for s in _scenes(5)] + [("c02", _lit(_scenes(1)[0], 1))]
    norm = fit_camera_norm(pairs, min_images=3)
    assert set(norm.gains) == {"c01"}
    assert norm.max_change(fit_camera_norm(pairs)) == 1.0  # a camera only one of them knows


def test_gains_are_bounded_for_a_camera_that_sees_no_blue():
    black_blue = [("c01", _lit(s, (1, 1, 0))) for s in _scenes(5)]
    assert max(fit_camera_norm(black_blue).gain("c01")) == pytest.approx(4.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"format": 1, "gains": {"c01": [1.0, 1.0]}},
        {"format": 1, "gains": {"c01": [1.0, 1.0, 90.0]}},
        {"format": 1, "gains": {"c01": [1.0, "x", 1.0]}},
        {"format": 7, "gains": {}},
        {"format": 2, "gains": {"c01": [1.0, 1.0, 1.0]}, "levels": {"c01": [40.0, 45.0]}},
        {"format": 2, "gains": {"c01": [1.0, 1.0, 1.0]}, "levels": {"c01": [-5.0, 200.0]}},
        {"format": 2, "gains": {"c01": [1.0, 1.0, 1.0]}, "levels": {"c02": [10.0, 200.0]}},
        {"format": 2, "gains": {"c01": [1.0, 1.0, 1.0]}, "levels": {"c01": [10.0]}},
    ],
)
def test_a_corrupt_file_is_refused_with_its_reason(bad):
    with pytest.raises(ValueError):
        CameraNorm.from_dict(bad)


def _exposed(scene: np.ndarray, black: float, span: float) -> Image.Image:
    """A camera's exposure: 0..255 squeezed into black..black+span (a dim, foggy camera)."""
    return Image.fromarray(np.clip(black + scene * (span / 255.0), 0, 255).astype(np.uint8))


def test_a_dim_camera_is_stretched_back_and_gains_only_leaves_it_dim():
    rng = np.random.default_rng(3)
    # grey scenes, so their luminance spans 0..255 like their channels
    grey = [rng.integers(0, 256, size=(32, 16, 1)).astype(np.float32) for _ in range(40)]
    scenes = [np.repeat(g, 3, axis=2) for g in grey]
    pairs = [("dim", _exposed(s, 60.0, 90.0)) for s in scenes]
    pairs += [("ok", Image.fromarray(s.astype(np.uint8))) for s in scenes]
    norm = fit_camera_norm(pairs)
    lo, hi = norm.levels["dim"]
    assert 58 <= lo <= 66 and 144 <= hi <= 152  # ~black + 1% / 99% of the span
    fixed = [np.asarray(norm.apply(img, "dim"), np.float32) for _, img in pairs[:40]]
    spread = np.mean([np.percentile(f, 99) - np.percentile(f, 1) for f in fixed])
    assert spread > 220  # was ~88: the camera's exposure is undone
    # what the stretch gives back is the scene itself, up to rounding of the dim camera
    assert np.mean([np.abs(f - s).mean() for f, s in zip(fixed, scenes, strict=True)]) < 8
    gains_only = fit_camera_norm(pairs, levels=False)
    assert gains_only.levels == {} and gains_only.version != norm.version
    dim = np.asarray(gains_only.apply(pairs[0][1], "dim"), np.float32)
    assert np.percentile(dim, 99) - np.percentile(dim, 1) < 100


def test_levels_round_trip_and_a_gains_only_file_still_reads():
    pairs = [("c01", _exposed(s, 50.0, 120.0)) for s in _scenes(20, 4)]
    norm = fit_camera_norm(pairs)
    again = CameraNorm.from_dict(norm.to_dict())
    assert again == norm and again.version == norm.version
    old = {"format": 1, "gains": {"c01": [1.0, 1.0, 1.0]}, "counts": {"c01": 5}}
    read = CameraNorm.from_dict(old)  # written before levels existed: gains, no levels
    assert read.levels == {} and read.gain("c01") is not None
    assert norm.max_change(read) == 1.0  # a node refits when its saved norm lacks levels
