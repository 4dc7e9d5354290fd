"""The frozen-prefix cache (common/prefix_cache.py): training and evaluation through it
give what the plain forward gives, it is really used, and it never serves activations of
other prefix weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.datasets import load_records
from common.evaluate import embed_records
from common.factory import create_model
from common.lora import LoraSettings, attach_lora, get_adapter_state
from common.prefix_cache import image_features_fn
from common.train import ImageBank, TrainConfig, train


@pytest.fixture
def records(tiny_dataset):
    return [r for r in load_records(tiny_dataset) if r.split == "train"]


def _lora_model(preset: str = "image-late"):
    return attach_lora(create_model("tiny-effnet"), LoraSettings(r=4, targets=(preset,)))


def _bank(model, records, *, cache: bool) -> ImageBank:
    bank = ImageBank(records, model.get_base_model().preprocess)
    if not cache:
        bank.prefix_cache.max_bytes = 0  # the plain path, as a bank too big to cache
    return bank


def test_depth_follows_what_trains() -> None:
    late = _lora_model().get_base_model().image_tower
    assert late.frozen_depth() == 12  # stem + blocks 0-10; LoRA starts at block 11
    mid = _lora_model("image-mid").get_base_model().image_tower
    assert mid.frozen_depth() == 6  # stem + blocks 0-4: the stages pre-training keeps frozen
    conv = _lora_model("image-conv").get_base_model().image_tower
    assert conv.frozen_depth() == 1  # only the stem (block 0's project conv has LoRA)
    full = create_model("tiny-effnet").image_tower
    assert full.frozen_depth() == 0  # full fine-tuning: everything requires grad


def test_training_through_the_cache_equals_the_plain_forward(records) -> None:
    cfg = TrainConfig(epochs=3, lr=5e-3, batch_size=8, seed=3, progress=False)
    runs = {}
    for cache in (True, False):
        model = _lora_model()
        bank = _bank(model, records, cache=cache)
        result = train(model, records, cfg, bank=bank)
        runs[cache] = (result.losses, get_adapter_state(model), bank.prefix_cache)
    (cached_losses, cached_state, cache), (plain_losses, plain_state, plain) = (
        runs[True],
        runs[False],
    )
    assert cache.store is not None and plain.store is None
    # both views of every crop were asked for over 3 epochs with random flips
    assert cache.store.filled.float().mean() > 0.9
    # the same activations: the first epoch agrees to float precision; after that Adam
    # (which divides by tiny second moments) grows last-bit differences (measured: 3e-4
    # relative by epoch 3), so later epochs and the adapter agree to a looser tolerance
    np.testing.assert_allclose(cached_losses[0], plain_losses[0], rtol=1e-5)
    np.testing.assert_allclose(cached_losses, plain_losses, rtol=2e-3)
    assert cached_losses[-1] < cached_losses[0]  # it really trained
    assert cached_state.keys() == plain_state.keys()


def test_gradients_through_cached_activations_equal_the_plain_ones(records) -> None:
    """The exact claim, one step: same outputs and same LoRA gradients, with part of the
    batch already cached and part computed in the call, mirrored and not."""
    model = _lora_model()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something
            torch.nn.init.normal_(param, std=0.1)
    core = model.get_base_model()
    model.train()
    idx, flip = torch.arange(8), torch.tensor([0, 1, 0, 1, 1, 0, 0, 1]).bool()
    out, grads = {}, {}
    for cache in (True, False):
        bank = _bank(model, records, cache=cache)
        features = image_features_fn(core, bank, "cpu")
        features(idx[:4], flip[:4])  # half of the batch cached before the step
        model.zero_grad()
        out[cache] = features(idx, flip)
        out[cache].pow(2).sum().backward()
        grads[cache] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    assert len(grads[True]) == len(grads[False]) > 10
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-5)
    for name, grad in grads[False].items():
        torch.testing.assert_close(
            grads[True][name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item()
        )


def test_evaluation_reuses_the_cache_and_follows_the_prefix_weights(records) -> None:
    model = _lora_model()
    bank, plain_bank = _bank(model, records, cache=True), _bank(model, records, cache=False)
    first = embed_records(model, records, bank=bank).gallery
    np.testing.assert_allclose(
        first, embed_records(model, records, bank=plain_bank).gallery, atol=1e-5
    )
    key = bank.prefix_cache.key
    # other frozen weights before the adapter (another base model): not the cached rows
    core = model.get_base_model()
    with torch.no_grad():
        core.image_tower._conv_stem.weight.mul_(-1.0)
    moved = embed_records(model, records, bank=bank).gallery
    assert bank.prefix_cache.key != key
    np.testing.assert_allclose(
        moved, embed_records(model, records, bank=plain_bank).gallery, atol=1e-5
    )
    assert np.abs(moved - first).max() > 1e-3
