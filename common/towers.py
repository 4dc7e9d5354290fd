"""The encoder towers a DualEncoder is made of: each maps its input to pooled features.

Every tower has `width` (its output size) and `lora_targets` (preset name -> regex over
module names relative to the tower), so LoRA settings can say "image-conv" or
"text-attention" without knowing which backbone sits underneath.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Residual block with GroupNorm: batch-independent, so federated clients with small
    local batches and ONNX/TensorRT exports see exactly the same normalisation."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.down = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + skip)


class ConvImageTower(nn.Module):
    """Our own small CNN image tower for the offline default (no pretrained vision weights
    exist offline). Pools with average + max so small accessories (bags, caps) survive;
    `stripes` > 0 adds part-based pooling (horizontal bands, as PCB does for person re-id)
    so "red top, blue trousers" and "blue top, red trousers" stay different vectors."""

    lora_targets: ClassVar[dict[str, str]] = {
        "image-conv": r".*\.(conv1|conv2|down|conv)",
        "image-stem": r"stem\.conv",
    }

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 1, 1),
        groups: int = 8,
        stem_stride: int = 1,
        stripes: int = 0,
    ) -> None:
        super().__init__()
        if stripes < 0:
            raise ValueError(f"`stripes` must be >= 0, got {stripes}")
        self.stripes = stripes
        self.stem = nn.Sequential()
        # stem_stride 2 halves the resolution before the first stage: about 5x less compute
        # for a 128x64 crop on CPU (1.33 s -> 0.28 s forward+backward per 64 crops, 1 thread).
        self.stem.add_module("conv", nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False))
        self.stem.add_module("norm", nn.GroupNorm(min(groups, widths[0]), widths[0]))
        self.stem.add_module("act", nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for width, depth in zip(widths, depths, strict=True):
            blocks = [
                ConvBlock(cin if i == 0 else width, width, 2 if i == 0 else 1, groups)
                for i in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.width = (2 + stripes) * widths[-1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(pixels))
        pooled = [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
        if self.stripes:
            bands = nn.functional.adaptive_avg_pool2d(x, (self.stripes, 1))
            pooled.append(bands.flatten(1))
        return torch.cat(pooled, dim=1)


class HFTextTower(nn.Module):
    """A transformers text encoder (BERT, MiniLM, DistilBERT, ...) with mean or CLS pooling."""

    lora_targets: ClassVar[dict[str, str]] = {
        "text-attention": r".*\.(query|value|q_lin|v_lin|q_proj|v_proj)",
        "text-ffn": r".*\.(intermediate\.dense|output\.dense|lin1|lin2|fc1|fc2)",
    }

    def __init__(
        self, model: nn.Module, tokenizer, pooling: str = "mean", max_length: int = 64
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"`pooling` must be mean, cls or pooler, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.width = model.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


class HFImageTower(nn.Module):
    """A transformers vision backbone (ResNet, ViT, CLIP vision, ...): pooled output."""

    lora_targets: ClassVar[dict[str, str]] = {
        "image-attention": r".*\.(query|value|q_proj|v_proj)",
        "image-conv": r".*\.(convolution|conv\d*)",
    }

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        sizes = getattr(cfg, "hidden_sizes", None)
        self.width = sizes[-1] if sizes else cfg.hidden_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled.flatten(1)
