"""The `cuda` embedding backend: PyTorch on an NVIDIA GPU with fp16 autocast.

For GPU machines without TensorRT (or while an engine is being built): the same merged
DualEncoder as the torch backend, moved to the GPU, with matmuls and convolutions in fp16
under autocast; outputs come back as float32 unit rows on the CPU, like every backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.adapters import adapter_version_of
from common.errors import ConfigError
from common.factory import create_model
from edge_node.accel.backend import no_text_tower
from edge_node.accel.eager import drop_text_tower


def require_cuda(device: str = "cuda") -> str:
    """The CUDA device to use, or ConfigError naming the way out."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "backend cuda needs an NVIDIA GPU visible to PyTorch (torch.cuda.is_available() "
            f"is False; torch {torch.__version__}). On a Jetson use JetPack's torch build; "
            'elsewhere choose backend = "torch" or "onnxruntime"'
        )
    return device if device.startswith("cuda") else "cuda"


class CudaBackend:
    name = "cuda"

    def __init__(
        self,
        model,
        adapter_version: str = "",
        *,
        fp16: bool = True,
        note: str = "",
        text_tower: bool = True,
    ):
        import torch

        self._torch = torch
        self.device = model.logit_scale.device
        if self.device.type != "cuda":
            raise ConfigError(f"CudaBackend needs the model on a CUDA device, got {self.device}")
        if not text_tower:
            drop_text_tower(model)
        self.model = model.eval()
        self.text_tower = text_tower
        self.fp16 = fp16
        self.version = str(model.version)
        self.query_version = model.query_version  # a student's teacher's version
        self.embed_dim = int(model.embed_dim)
        self.adapter_version = adapter_version
        self.note = note or f"pytorch on {torch.cuda.get_device_name(self.device)}" + (
            " (fp16 autocast)" if fp16 else " (fp32)"
        )

    def _autocast(self):
        torch = self._torch
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        if not self.text_tower:
            raise no_text_tower(self.name)
        with self._torch.inference_mode(), self._autocast():
            out = self.model.encode_text(list(texts))
        return np.ascontiguousarray(out.float().numpy(), dtype=np.float32)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        with self._torch.inference_mode(), self._autocast():
            out = self.model.encode_images(list(images))
        return np.ascontiguousarray(out.float().numpy(), dtype=np.float32)

    def encode_pixels(self, pixels) -> np.ndarray:
        """(n, 3, H, W) normalised pixels (numpy or torch) -> (n, D) unit rows."""
        torch = self._torch
        with torch.inference_mode(), self._autocast():
            out = self.model.encode_image(torch.as_tensor(pixels))
        return np.ascontiguousarray(out.float().numpy(), dtype=np.float32)


def load(
    model_spec: str, adapter: Path | None = None, device: str = "cuda", *, text_tower: bool = True
) -> CudaBackend:
    device = require_cuda(device)
    model = create_model(model_spec, adapter=adapter, device=device)
    return CudaBackend(model, adapter_version=adapter_version_of(adapter), text_tower=text_tower)
