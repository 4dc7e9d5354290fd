"""Image preprocessing with PIL and numpy (no torchvision works on these machines).

The `PreprocessCfg` travels with the model (saved in its model directory and in ONNX
manifests), so inference preprocessing on a node cannot drift from training.

`to_pixels` is the one definition of inference pixels, in numpy: an export backend
(onnxruntime) uses it as is and never imports torch; `to_batch` is the same array as a
torch tensor. `normalize_uint8` normalises uint8 caches on the training device and is
pinned to give exactly `to_pixels`'s values (tests/common/test_config_preprocess.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import DatasetError

if TYPE_CHECKING:  # torch is imported by the functions that return tensors, only
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessCfg:
    """How a crop becomes a tensor.

    size: (height, width); person crops are tall, 2:1 by default.
    resize: "pad" keeps the aspect ratio and pads with the mean colour (a crop stays a
        person); "stretch" resizes to the exact size (what square CLIP towers expect).
    """

    size: tuple[int, int] = (128, 64)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "pad"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"`size` must be (height, width) >= 8, got {self.size}")
        if self.resize not in ("pad", "stretch"):
            raise ValueError(f"`resize` must be 'pad' or 'stretch', got {self.resize!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"`std` must be positive, got {self.std}")

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessCfg:
        return cls(
            size=tuple(data.get("size", (128, 64))),
            mean=tuple(data.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(data.get("std", (0.5, 0.5, 0.5))),
            resize=data.get("resize", "pad"),
        )


def load_image(source: str | Path | bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode an image fully into RGB, or raise DatasetError saying what is wrong with it."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise DatasetError("empty image data")
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        if img.width * img.height > max_pixels:
            raise DatasetError(f"{name}: image too large ({img.width}x{img.height})")
        img.load()  # force decoding so truncated files fail here, not later
        return img.convert("RGB")
    except FileNotFoundError as err:
        raise DatasetError(f"image not found: {name}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{name}: not a readable image ({err})") from err


def resize_uint8(img: Image.Image, cfg: PreprocessCfg) -> np.ndarray:
    """Resize (and pad) to cfg.size; returns HxWx3 uint8 so caches stay small."""
    h, w = cfg.size
    if cfg.resize == "stretch":
        return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.uint8)
    scale = min(w / img.width, h / img.height)
    nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    fill = tuple(round(m * 255) for m in cfg.mean)
    canvas = Image.new("RGB", (w, h), fill)
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def normalize_uint8(batch: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    """(n,H,W,3) uint8 -> (n,3,H,W) float32 normalised, on the batch's device (training)."""
    import torch

    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_pixels(images: Sequence[Image.Image], cfg: PreprocessCfg) -> np.ndarray:
    """PIL crops -> (n,3,H,W) float32 normalised pixels, in numpy (no torch)."""
    arr = np.stack([resize_uint8(im, cfg) for im in images]).transpose(0, 3, 1, 2)
    x = arr.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def to_tensor(img: Image.Image, cfg: PreprocessCfg) -> torch.Tensor:
    return to_batch([img], cfg)[0]


def to_batch(images: Sequence[Image.Image], cfg: PreprocessCfg) -> torch.Tensor:
    """`to_pixels` as a torch tensor."""
    import torch

    return torch.from_numpy(to_pixels(images, cfg))
