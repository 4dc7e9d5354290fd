"""Config loading (kebab-case, unknown keys) and preprocessing of good and bad images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import from_dict, load_toml
from common.errors import ConfigError, DatasetError
from common.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessCfg,
    load_image,
    normalize_uint8,
    resize_uint8,
    to_batch,
    to_pixels,
)


@dataclass(frozen=True)
class Inner:
    size: int = 1


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float = 0.5
    tags: tuple[str, ...] = ()
    inner: Inner = Inner()


def test_toml_kebab_case_and_nested(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "n1"\nrate = 2\ntags = ["a", "b"]\n[inner]\nsize = 3\n')
    cfg = from_dict(Outer, load_toml(path), str(path))
    assert cfg == Outer("n1", 2.0, ("a", "b"), Inner(3))


def test_unknown_and_mistyped_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) colour"):
        from_dict(Outer, {"name": "x", "colour": 1}, "node.toml")
    with pytest.raises(ConfigError, match=r"node.toml.rate: expected float"):
        from_dict(Outer, {"name": "x", "rate": "fast"}, "node.toml")
    with pytest.raises(ConfigError, match="node.toml.inner: unknown key"):
        from_dict(Outer, {"name": "x", "inner": {"sise": 2}}, "node.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "none.toml")


def test_preprocess_pads_to_size_and_normalises(tmp_path: Path) -> None:
    cfg = PreprocessCfg(size=(32, 16))
    wide = Image.new("RGB", (40, 10), (255, 255, 255))
    batch = to_batch([wide, Image.new("RGB", (16, 32), (0, 0, 0))], cfg)
    assert batch.shape == (2, 3, 32, 16)
    assert torch.allclose(batch[1], torch.full_like(batch[1], -1.0))
    assert batch[0, :, 16, 8].allclose(torch.ones(3))  # the image sits in the middle
    assert batch[0, :, 0, 8].allclose(torch.zeros(3), atol=0.01)  # padded with the mean colour
    with pytest.raises(ValueError, match="resize"):
        PreprocessCfg(resize="crop")


@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_numpy_pixels_equal_the_training_normalisation_exactly(resize: str) -> None:
    """`to_pixels` (numpy: export backends, no torch) and `normalize_uint8` (torch: the
    training caches, on the device) give the same float32 bits; `to_batch` is `to_pixels`."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 20 + 2 * i, 3), dtype=np.uint8))
        for i in range(5)
    ]
    cfg = PreprocessCfg(size=(32, 16), mean=CLIP_MEAN, std=CLIP_STD, resize=resize)
    cached = torch.from_numpy(np.stack([resize_uint8(im, cfg) for im in images]))
    pixels = to_pixels(images, cfg)
    assert pixels.dtype == np.float32 and pixels.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(pixels, normalize_uint8(cached, cfg).numpy())
    np.testing.assert_array_equal(pixels, to_batch(images, cfg).numpy())


def test_corrupt_empty_and_missing_images_are_named(tmp_path: Path) -> None:
    good = tmp_path / "g.jpg"
    Image.new("RGB", (20, 40), (1, 2, 3)).save(good)
    assert load_image(good).size == (20, 40)
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DatasetError, match="t.jpg: not a readable image"):
        load_image(truncated)
    with pytest.raises(DatasetError, match="empty image"):
        load_image(b"")
    with pytest.raises(DatasetError, match="not found"):
        load_image(tmp_path / "none.jpg")
    with pytest.raises(DatasetError, match="too large"):
        load_image(good, max_pixels=100)
