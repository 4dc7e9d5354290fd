"""Embedding backends: the one seam between the node and whatever runs the model.

Why a seam: on a laptop the node runs PyTorch eager; on a Jetson the same daemon runs an
ONNX Runtime or TensorRT export of the same merged model. The node only needs
`encode_text`, `encode_images`, `version`, `embed_dim` and a `name`, so a backend is any
object with those, made by the module that `edge_node.accel.registry` names for the
config's `backend` key. One backend object per (model, adapter) pair lives in a process;
the service and the indexer share it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from common.errors import AdapterMismatch
from edge_node.accel.registry import backend_module


class EmbeddingBackend(Protocol):
    """What the node needs from a model. Outputs are float32 (n, embed_dim), L2-normalised."""

    name: str  # "torch", "onnxruntime", ...
    version: str  # identical on every machine for the same base + adapter
    adapter_version: str  # "" for the base model
    embed_dim: int
    note: str  # shown in Status, e.g. "onnx export pending, serving with torch"

    def encode_text(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


BackendLoader = Callable[[str, "Path | None", str], EmbeddingBackend]


def load_backend(
    backend: str, model_spec: str, adapter: Path | None = None, device: str = "cpu"
) -> EmbeddingBackend:
    """Build and sanity-check a backend; a model that yields wrong or non-finite embeddings
    is refused here, before it can reach an index."""
    instance = backend_module(backend).load(model_spec, adapter, device)
    probe = instance.encode_text(["a person in a red jacket"])
    if probe.shape != (1, instance.embed_dim) or not np.isfinite(probe).all():
        raise AdapterMismatch(
            f"model {model_spec!r} with adapter {adapter} produced an invalid embedding "
            f"(shape {probe.shape}, finite={bool(np.isfinite(probe).all())}); refusing it"
        )
    return instance
