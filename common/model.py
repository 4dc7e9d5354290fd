"""DualEncoder: an image tower and a text tower projected into one normalised space.

All families (CLIP, the seed paper's ResNet+DistilBERT, our offline default, the tiny test
configs) are this one class with different towers, so LoRA, training, evaluation, export
and serving never branch on the family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.preprocess import PreprocessCfg, to_batch


class DualEncoder(nn.Module):
    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        *,
        embed_dim: int,
        preprocess: PreprocessCfg,
        name: str,
        spec: dict,
        image_proj: nn.Module | None = None,
        text_proj: nn.Module | None = None,
        logit_scale: float = math.log(1 / 0.07),
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = image_proj or nn.Linear(image_tower.width, embed_dim)
        self.text_proj = text_proj or nn.Linear(text_tower.width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.embed_dim = embed_dim
        self.preprocess = preprocess
        self.name = name
        self.spec = spec  # the resolved model config, saved with the model
        self.fingerprint = ""  # set by the factory: identifies architecture + base weights
        self.version = ""  # set by the factory: fingerprint plus adapter, if any
        # set by the factory when a merged adapter changed the text tower (see text_fingerprint)
        self.text_adapter_version = ""
        # a distilled student: its teacher's record (common.distill.teacher_record); the
        # teacher's query vectors search this model's index
        self.teacher: dict = {}

    @property
    def text_fingerprint(self) -> str:
        """Identifies the text tower's weights: the key of cached caption features
        (common.train.TextFeatureCache). The base fingerprint, unless a merged adapter
        changed the text tower: features cached for the base model are then not this one's."""
        return self.text_adapter_version or self.fingerprint

    @property
    def query_version(self) -> str:
        """The model version whose query vectors search this model's index: a distilled
        student's teacher's (it kept the teacher's text tower and text projection and was
        trained into the teacher's space), else this model's own version."""
        return str(self.teacher.get("model_version") or self.version)

    # ------------------------------------------------------------------ features
    def lora_presets(self) -> dict[str, str]:
        """Preset name -> regex over full module names (what peft's target_modules takes)."""
        presets = {}
        for prefix, tower in (("image_tower", self.image_tower), ("text_tower", self.text_tower)):
            for key, pattern in getattr(tower, "lora_targets", {}).items():
                presets[key] = rf"{prefix}\.{pattern}"
        presets["projections"] = r"(image_proj|text_proj)"
        return presets

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image embeddings (the training path)."""
        return self.image_proj(self.image_tower(pixels))

    def text_backbone(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled text-tower output before projection: what a frozen-text cache stores."""
        device = self.logit_scale.device
        tokens = {k: v.to(device) for k, v in self.text_tower.tokenize(texts).items()}
        return self.text_tower(**tokens)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_proj(self.text_backbone(texts))

    def forward(self, pixels: torch.Tensor, texts: Sequence[str]):
        img = F.normalize(self.image_features(pixels), dim=-1)
        txt = F.normalize(self.text_features(texts), dim=-1)
        return img, txt, self.logit_scale.exp()

    # ------------------------------------------------------------------ inference API
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(n, d) float32, L2-normalised, on CPU."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        out = [torch.empty(0, self.embed_dim)]
        with eval_mode(self):
            for i in range(0, len(texts), batch_size):
                feats = self.text_features(texts[i : i + batch_size])
                out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(n,3,H,W) normalised pixels -> (n, d) float32, L2-normalised, on CPU."""
        device = self.logit_scale.device
        out = [torch.empty(0, self.embed_dim)]
        with eval_mode(self):
            for i in range(0, pixels.shape[0], batch_size):
                feats = self.image_features(pixels[i : i + batch_size].to(device))
                out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """PIL crops -> embeddings, preprocessing with the model's own PreprocessCfg."""
        out = [torch.empty(0, self.embed_dim)]
        for i in range(0, len(images), batch_size):
            out.append(self.encode_image(to_batch(images[i : i + batch_size], self.preprocess)))
        return torch.cat(out)

    def image_tower_params(self) -> int:
        """Parameters a node needs to embed crops (image tower + projection)."""
        return sum(p.numel() for m in (self.image_tower, self.image_proj) for p in m.parameters())

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def eval_mode(module: nn.Module):
    """Temporarily switch to eval (dropout off) and restore the caller's mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
