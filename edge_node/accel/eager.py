"""The `torch` embedding backend: PyTorch eager inference, the reference every export
is checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.adapters import adapter_version_of
from common.factory import create_model
from edge_node.accel.backend import no_text_tower


def drop_text_tower(model) -> None:
    """Free a DualEncoder's text tower and text projection (a vector-only node keeps only
    the image side); its `encode_text` cannot run afterwards."""
    model.text_tower = None
    model.text_proj = None


class TorchBackend:
    """PyTorch eager inference of a `common` DualEncoder (adapter merged at load)."""

    name = "torch"

    def __init__(
        self, model, adapter_version: str = "", note: str = "", *, text_tower: bool = True
    ) -> None:
        if not text_tower:
            drop_text_tower(model)
        self.model = model.eval()
        self.version = str(model.version)
        self.query_version = model.query_version  # a student's teacher's version
        self.embed_dim = int(model.embed_dim)
        self.adapter_version = adapter_version
        self.note = note
        self.text_tower = text_tower

    def encode_text(self, texts: list[str]) -> np.ndarray:
        if not self.text_tower:
            raise no_text_tower(self.name)
        with torch.inference_mode():
            out = self.model.encode_text(list(texts))
        return np.ascontiguousarray(out.detach().float().cpu().numpy(), dtype=np.float32)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model.encode_images(list(images))
        return np.ascontiguousarray(out.detach().float().cpu().numpy(), dtype=np.float32)


def load(
    model_spec: str, adapter: Path | None = None, device: str = "cpu", *, text_tower: bool = True
) -> TorchBackend:
    model = create_model(model_spec, adapter=adapter, device=device)
    return TorchBackend(model, adapter_version=adapter_version_of(adapter), text_tower=text_tower)
