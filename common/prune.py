"""Structured pruning of the CNN image tower: fewer channels, so a CPU actually runs faster.

What is removed: the inner channels of every residual block (conv1's filters, norm1's
channels, conv2's matching input channels). They touch no skip connection, so removing them
needs no bookkeeping across blocks, and conv1 + conv2 hold most of the tower's compute.
Criterion: the L1 norm of each conv1 filter times |gamma| of its GroupNorm channel (a filter
that is small or that its norm scales down contributes little; Li et al. 2017 use the
filter norm, network slimming the norm's scale). Kept counts are rounded to a multiple of
the GroupNorm group count so every group keeps the same size. GroupNorm then normalises over
fewer channels, so even kept channels change: a short recovery (`common.distill` with the
unpruned model as teacher) is part of pruning, not optional. Unstructured (zeroed) weights
would save nothing on a CPU; dense, narrower convs do.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from common.errors import ConfigError
from common.model import DualEncoder
from common.towers import ConvBlock, ConvImageTower


def _kept_count(channels: int, keep: float, groups: int) -> int:
    step = min(groups, channels)
    return max(step, round(channels * keep / step) * step)


def _filter_scores(block: ConvBlock) -> torch.Tensor:
    l1 = block.conv1.weight.detach().abs().sum(dim=(1, 2, 3))
    return l1 * block.norm1.weight.detach().abs()


def _shrink_block(block: ConvBlock, kept: torch.Tensor, groups: int) -> None:
    conv1, norm1, conv2 = block.conv1, block.norm1, block.conv2
    n = len(kept)
    new1 = nn.Conv2d(
        conv1.in_channels, n, conv1.kernel_size, conv1.stride, conv1.padding, bias=False
    )
    new1.weight.data = conv1.weight.data[kept].clone()
    norm = nn.GroupNorm(min(groups, n), n, eps=norm1.eps)
    norm.weight.data = norm1.weight.data[kept].clone()
    norm.bias.data = norm1.bias.data[kept].clone()
    new2 = nn.Conv2d(
        n, conv2.out_channels, conv2.kernel_size, conv2.stride, conv2.padding, bias=False
    )
    new2.weight.data = conv2.weight.data[:, kept].clone()
    block.conv1, block.norm1, block.conv2 = new1, norm, new2


def prune_image_tower(model: DualEncoder, keep: float) -> DualEncoder:
    """A copy of `model` whose CNN blocks keep a `keep` share of their inner channels.

    The copy's spec records the new inner widths (`image.mids`), so `save_model` writes a
    directory the factory rebuilds with the right shapes."""
    if not 0 < keep <= 1:
        raise ConfigError(f"`keep` must be in (0, 1], got {keep}")
    tower = model.image_tower
    if not isinstance(tower, ConvImageTower):
        raise ConfigError(
            f"pruning needs the CNN image tower (`image.type = cnn`), model {model.name!r} "
            f"has {type(tower).__name__}"
        )
    if getattr(model, "peft_config", None) is not None or any(
        "lora_" in n for n, _ in model.named_parameters()
    ):
        raise ConfigError("prune a merged model (create_model(..., adapter=)), not a LoRA one")
    groups = int(model.spec["image"].get("groups", 8))
    pruned = copy.deepcopy(model)
    mids = []
    for stage in pruned.image_tower.stages:
        for block in stage:
            n = _kept_count(block.conv1.out_channels, keep, groups)
            kept = torch.sort(torch.topk(_filter_scores(block), n).indices).values
            _shrink_block(block, kept, groups)
        mids.append(n)
    pruned.spec = copy.deepcopy(model.spec)
    pruned.spec["image"]["mids"] = mids
    pruned.name = f"{model.name}-pruned{round(100 * (1 - keep))}"
    return pruned
