"""The sceptic's colour baselines undo what they claim to undo, on pixels with a known map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.datasets import Record
from sims.synth.cameras import turn_about_grey
from sims.synth.sceptics import (
    ColourMatch,
    fit_hue_alignment,
    fit_moment_match,
    fit_sceptics,
    hue_turn_estimate,
)


def _colourful(n: int = 6000, seed: int = 0) -> np.ndarray:
    """Pixels with an uneven hue distribution (a bright red and a weaker blue cluster, greys)."""
    rng = np.random.default_rng(seed)
    red = np.clip(rng.normal([0.8, 0.2, 0.2], 0.05, (n // 2, 3)), 0, 1)
    blue = np.clip(rng.normal([0.3, 0.35, 0.6], 0.05, (n // 4, 3)), 0, 1)
    grey = np.repeat(rng.uniform(0.1, 0.9, (n - n // 2 - n // 4, 1)), 3, axis=1)
    return np.concatenate([red, blue, grey])


@pytest.mark.parametrize("degrees", [-120.0, -35.0, 60.0, 175.0])
def test_hue_alignment_finds_a_turn_about_grey_and_undoes_it(degrees):
    src = _colourful()
    cam = _colourful(seed=1) @ turn_about_grey(degrees).T
    assert abs(((hue_turn_estimate(cam, src) - degrees + 180) % 360) - 180) <= 5.0
    a, mean, target = fit_hue_alignment({"c01": cam}, src).maps["c01"]
    back = (cam - mean) @ a.T + target
    assert np.abs(back.mean(0) - _colourful(seed=1).mean(0)).max() < 0.03
    assert np.allclose(turn_about_grey(degrees) @ np.ones(3), np.ones(3))  # grey stays grey


def test_moment_match_gives_the_source_mean_and_covariance():
    src = _colourful()
    mix = np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.2], [0.2, 0.1, 0.9]])
    cam = _colourful(seed=2) @ mix.T + np.array([0.1, 0.0, -0.05])
    a, mean, target = fit_moment_match({"c01": cam}, src).maps["c01"]
    back = (cam - mean) @ a.T + target
    assert np.allclose(back.mean(0), src.mean(0), atol=1e-6)
    assert np.allclose(np.cov(back.T), np.cov(src.T), atol=1e-4)


def test_a_colour_match_applies_per_camera_and_leaves_others_alone(tmp_path):
    turn = turn_about_grey(120.0)
    match = ColourMatch({"c01": (turn, np.zeros(3), np.zeros(3))})
    red = Image.new("RGB", (8, 8), (200, 40, 40))
    assert match.apply(red, "c02") is red
    r, g, b = np.asarray(match.apply(red, "c01"), np.float32).mean((0, 1))
    assert g > r and g > b  # red turned by +120 degrees is green


def test_fit_sceptics_on_files_recovers_a_turned_camera(tmp_path):
    rng = np.random.default_rng(3)
    paths = {"src": [], "c01": []}
    for i in range(12):
        px = _colourful(n=32 * 16, seed=10 + i)[rng.permutation(32 * 16)].reshape(32, 16, 3)
        for cam, img in (("src", px), ("c01", px @ turn_about_grey(90.0).T)):
            path = tmp_path / f"{cam}_{i}.png"
            Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).save(path)
            paths[cam].append(str(path))
    fitted = fit_sceptics(
        [Record(Path(p), ("a person",), i, camera_id="c01") for i, p in enumerate(paths["c01"])],
        [Record(Path(p), ("a person",), i, camera_id="s01") for i, p in enumerate(paths["src"])],
    )
    assert set(fitted) == {"hue_turn", "hue_turn_person", "colour_moments"}
    for name in ("hue_turn", "hue_turn_person"):
        a = fitted[name].maps["c01"][0]
        assert np.allclose(a, turn_about_grey(-90.0), atol=0.1), name
