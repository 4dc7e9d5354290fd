"""Embedding backends: the one seam between the node and whatever runs the model.

Why a seam: on a laptop the node runs PyTorch eager; on a Jetson the same daemon should run
an ONNX Runtime or TensorRT export of the same merged model (issue 8 adds those). The node
only needs `encode_text`, `encode_images`, `version`, `embed_dim` and a `name`, so a backend
is any object with those, created by a loader registered in `LOADERS` under the name used by
the config's `backend` key. One backend object per (model, adapter) pair lives in a process;
the service and the indexer share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from common.errors import AdapterMismatch, ConfigError
from edge_node.accel.resolve import (
    LOADERS as ACCEL_LOADERS,  # onnxruntime, tensorrt, cuda (issue 8)
)

log = logging.getLogger(__name__)


class EmbeddingBackend(Protocol):
    """What the node needs from a model. Outputs are float32 (n, embed_dim), L2-normalised."""

    name: str  # "torch", "onnxruntime", ...
    version: str  # identical on every machine for the same base + adapter
    adapter_version: str  # "" for the base model
    embed_dim: int
    note: str  # shown in Status, e.g. "onnx export pending, serving with torch"

    def encode_text(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


class TorchBackend:
    """PyTorch eager inference of a `common` DualEncoder (adapter merged at load)."""

    name = "torch"

    def __init__(self, model, adapter_version: str = "", note: str = "") -> None:
        import torch

        self._torch = torch
        self.model = model.eval()
        self.version = str(model.version)
        self.embed_dim = int(model.embed_dim)
        self.adapter_version = adapter_version
        self.note = note

    @classmethod
    def load(
        cls, model_spec: str, adapter: Path | None = None, device: str = "cpu"
    ) -> TorchBackend:
        from common.factory import create_model

        model = create_model(model_spec, adapter=adapter, device=device)
        return cls(model, adapter_version=adapter_version_of(adapter))

    def encode_text(self, texts: list[str]) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model.encode_text(list(texts))
        return np.ascontiguousarray(out.detach().float().cpu().numpy(), dtype=np.float32)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model.encode_images(list(images))
        return np.ascontiguousarray(out.detach().float().cpu().numpy(), dtype=np.float32)


def adapter_version_of(adapter: Path | None) -> str:
    """The adapter's short fingerprint from its manifest ("" for the base model): the same
    on every node that holds the same weights."""
    if adapter is None:
        return ""
    from common.adapters import read_manifest

    return read_manifest(adapter).adapter_version


BackendLoader = Callable[[str, "Path | None", str], EmbeddingBackend]

# name in the node config -> loader(model_spec, adapter_dir, device). Issue 8 registers more.
LOADERS: dict[str, BackendLoader] = {"torch": TorchBackend.load, **ACCEL_LOADERS}


def load_backend(
    backend: str, model_spec: str, adapter: Path | None = None, device: str = "cpu"
) -> EmbeddingBackend:
    """Build and sanity-check a backend; a model that yields wrong or non-finite embeddings
    is refused here, before it can reach an index."""
    loader = LOADERS.get(backend)
    if loader is None:
        raise ConfigError(
            f"backend {backend!r} is not available in this build; available: {', '.join(LOADERS)}"
        )
    instance = loader(model_spec, adapter, device)
    probe = instance.encode_text(["a person in a red jacket"])
    if probe.shape != (1, instance.embed_dim) or not np.isfinite(probe).all():
        raise AdapterMismatch(
            f"model {model_spec!r} with adapter {adapter} produced an invalid embedding "
            f"(shape {probe.shape}, finite={bool(np.isfinite(probe).all())}); refusing it"
        )
    return instance
