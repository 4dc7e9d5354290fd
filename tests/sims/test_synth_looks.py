"""Camera looks: what a per-camera colour gain cannot undo (v4 default, v3), v2 still
selectable, tracklets."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.camera_norm import fit_camera_norm
from sims.synth import SynthConfig, generate
from sims.synth.cameras import (
    LOOKS_V2,
    LOOKS_V3,
    LOOKS_V4,
    LOOKS_V5,
    LOOKS_V6,
    apply_camera,
    make_camera_style,
    turn_about_grey,
)

TINY = dict(
    identities=16,
    source_identities=2,
    cameras=8,
    nodes=4,
    images_per_camera=3,
    source_cameras=1,
    size=(64, 32),
    cameras_per_identity=(3, 5),
)


@pytest.fixture(scope="module")
def v4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v4")
    generate(SynthConfig(**TINY), out, workers=1)
    return out


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v3")
    generate(SynthConfig(**{**TINY, "looks": "v3"}), out, workers=1)
    return out


def _records(root: Path) -> list[dict]:
    return json.loads((root / "annotations.json").read_text())


def _by_camera(root: Path) -> dict[str, list[np.ndarray]]:
    cams = defaultdict(list)
    for r in _records(root):
        cams[r["camera"]].append(np.asarray(Image.open(root / r["file_path"]), np.float32))
    return cams


def _looks(root: Path) -> dict[str, str]:
    return {c: info["look"] for c, info in json.loads((root / "cameras.json").read_text()).items()}


def test_every_look_is_on_a_camera_and_v2_is_still_selectable(v4, v3, tmp_path):
    assert {_looks(v4)[f"c{i:02d}"] for i in range(1, 9)} == set(LOOKS_V4)
    assert {_looks(v3)[f"c{i:02d}"] for i in range(1, 9)} == set(LOOKS_V3)
    rng = np.random.default_rng(0)
    assert make_camera_style("c01", 0, "strong", rng, "v2").look == next(iter(LOOKS_V2))
    generate(SynthConfig(**{**TINY, "identities": 4, "looks": "v2"}), tmp_path / "v2", workers=1)
    v2 = json.loads((tmp_path / "v2" / "cameras.json").read_text())
    assert {v2[f"c{i:02d}"]["look"] for i in range(1, 9)} == set(LOOKS_V2)


def test_night_mode_stays_monochrome_after_white_balance(v3):
    looks = json.loads((v3 / "cameras.json").read_text())
    night = next(c for c, i in looks.items() if i["look"] == "nir-night")
    images = _by_camera(v3)[night]
    norm = fit_camera_norm((night, im.astype(np.uint8)) for im in images)
    fixed = [np.asarray(norm.apply(Image.fromarray(im.astype(np.uint8)), night), np.float32)
             for im in images]  # fmt: skip
    chroma = np.mean([np.abs(im - im.mean(axis=2, keepdims=True)).mean() for im in fixed])
    assert chroma < 6.0  # no colour came back: the look is not a per-channel gain


def test_a_look_without_a_second_light_has_exactly_none():
    """A jittered neutral split light divided half of every frame by its own cast (a bug
    found by measuring: sodium-mono's crops were half uncorrected)."""
    for i, look in enumerate(LOOKS_V3):
        style = make_camera_style(f"c{i:02d}", i, "strong", np.random.default_rng(i), "v3")
        assert style.look == look
        if "split_cast" not in LOOKS_V3[look]:
            assert style.split_cast == (1.0, 1.0, 1.0)
        if "cast" not in LOOKS_V3[look]:
            assert style.cast == (1.0, 1.0, 1.0)


def test_spatial_looks_vary_across_the_frame(v3):
    """Mixed light: left and right halves of one camera's crops have different casts."""
    looks = json.loads((v3 / "cameras.json").read_text())
    cam = next(c for c, i in looks.items() if i["look"] == "mixed-light")
    ratios = []
    for im in _by_camera(v3)[cam]:
        left, right = im[:, :8].reshape(-1, 3).mean(0), im[:, -8:].reshape(-1, 3).mean(0)
        ratios.append(
            abs(np.log((left[0] + 1) / (left[2] + 1)) - np.log((right[0] + 1) / (right[2] + 1)))
        )
    assert np.median(ratios) > 0.3  # one gain per camera cannot fix both sides


def test_a_visit_is_a_tracklet_of_crops_close_in_time_with_one_view(v4):
    tracks = defaultdict(list)
    for r in _records(v4):
        if r["split"] != "source":
            tracks[r["tracklet"]].append(r)
    assert len(tracks) > 16
    for crops in tracks.values():
        assert len(crops) == TINY["images_per_camera"]
        assert len({(c["id"], c["camera"], c["view"]) for c in crops}) == 1
        stamps = sorted(c["timestamp_ms"] for c in crops)
        assert stamps[-1] - stamps[0] < 5_000
    per_person = defaultdict(set)
    for t, crops in tracks.items():
        per_person[crops[0]["id"]].add(t)
    assert all(len(ts) >= TINY["cameras_per_identity"][0] for ts in per_person.values())


def _side_difference(im: np.ndarray, axis: str) -> float:
    """How far apart the light colours of two opposite edges are: the L2 distance of their
    log-chromaticities (8 px strips across x, 16 px across y)."""
    a, b = (im[:, :8], im[:, -8:]) if axis == "x" else (im[:16], im[-16:])
    chroma = [np.log(e.reshape(-1, 3).mean(0) + 1.0) for e in (a, b)]
    chroma = [c - c.mean() for c in chroma]
    return float(np.linalg.norm(chroma[0] - chroma[1]))


def test_v4_two_lights_survive_gray_world_per_camera_and_per_image(v4, tmp_path):
    """The two lights of every v4 camera stay apart after the camera's gray-world gains and
    after each image's own; v2's one light has no such difference to begin with. The
    distance between two log-chromaticities of one frame does not change under any gain
    applied to the whole frame (the log of the gain cancels), so this checks that every v4
    frame carries a colour difference that no white balance, per camera or per image, can
    remove, and that the uint8 clipping of the normalised images does not blur it."""
    generate(SynthConfig(**{**TINY, "identities": 8, "looks": "v2"}), tmp_path, workers=1)
    for root, lo, hi in ((v4, 0.3, np.inf), (tmp_path, 0.0, 0.15)):
        for cam, look in _looks(root).items():
            if cam.startswith("s"):
                continue
            axis = LOOKS_V4.get(look, {}).get("split_axis", "x")
            images = [im.astype(np.uint8) for im in _by_camera(root)[cam]]
            # gains only: the check is about white balance (levels shift, which moves chroma)
            norm = fit_camera_norm(((cam, im) for im in images), levels=False)
            fixed = {"camera": [norm.apply(Image.fromarray(im), cam) for im in images]}
            fixed["image"] = [
                fit_camera_norm([("self", im)], levels=False).apply(Image.fromarray(im), "self")
                for im in images
            ]
            for how, ims in fixed.items():
                d = np.median([_side_difference(np.asarray(i, np.float32), axis) for i in ims])
                assert lo < d < hi, f"{look} after per-{how} gray-world: {d:.2f}"


def test_v4_exposure_curves_are_not_gains():
    """Every v4 camera has an exposure curve (gamma and/or haze) besides its two lights."""
    for i, look in enumerate(LOOKS_V4):
        style = make_camera_style(f"c{i:02d}", i, "strong", np.random.default_rng(i), "v4")
        assert style.look == look and style.split_cast != (1.0, 1.0, 1.0)
        assert abs(style.gamma - 1.0) > 0.3 or style.haze > 0.2


def test_v5_hue_turns_keep_grey_and_move_colour_by_the_angle():
    """v5 (not the default): a turn about the grey axis, which no gain or level undoes."""
    turn = turn_about_grey(120.0)
    assert np.allclose(turn @ np.ones(3), np.ones(3), atol=1e-6)  # grey stays grey
    assert np.allclose(turn @ turn.T, np.eye(3), atol=1e-6)  # a rotation: nothing lost
    assert np.allclose(turn @ np.array([1.0, 0.0, 0.0]), [0.0, 1.0, 0.0], atol=1e-6)  # R -> G
    for i, look in enumerate(LOOKS_V5):
        style = make_camera_style(f"c{i:02d}", i, "strong", np.random.default_rng(i), "v5")
        assert style.look == look and abs(style.hue - LOOKS_V5[look]["hue"]) <= 8.0
    red = Image.new("RGB", (8, 16), (200, 40, 40))
    style = make_camera_style("c07", 6, "strong", np.random.default_rng(0), "v5")  # ~ +120
    r, g, b = np.asarray(apply_camera(red, style, np.random.default_rng(0)), np.float32).mean(
        (0, 1)
    )
    assert g > r and g > b  # a red jacket filmed green


def test_v6_turns_hues_like_v5_over_a_vivid_scene_per_camera():
    """v6 (not the default): v5's turns; each camera's scene colours are saturated and of
    the look's own scene hue."""
    import colorsys

    for i, look in enumerate(LOOKS_V6):
        style = make_camera_style(f"c{i:02d}", i, "strong", np.random.default_rng(i), "v6")
        assert style.look == look and abs(style.hue - LOOKS_V6[look]["hue"]) <= 8.0
        for rgb in style.bg_colours:
            h, s, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
            turned = (h * 360 - LOOKS_V6[look]["scene_hue"] + 180) % 360 - 180
            assert s >= 0.5 and abs(turned) <= 16.0
