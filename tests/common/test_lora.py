"""LoRA: exact trainable counts, state checks, adapter round trip, merge parity."""

from __future__ import annotations

import re

import pytest
import torch

from common.adapters import load_adapter, read_manifest, save_adapter
from common.errors import AdapterMismatch, ConfigError
from common.factory import create_lora_model, create_model
from common.lora import (
    LoraSettings,
    attach_lora,
    check_adapter_state,
    get_adapter_state,
    is_lora_a,
    lora_a_digest,
    merge_adapter,
    resolve_targets,
    set_adapter_state,
    trainable_parameter_count,
)


def expected_lora_params(model, settings: LoraSettings) -> int:
    """r*(in+out) per Linear, in*r*k*k + r*out per Conv2d, computed from module shapes."""
    pattern = resolve_targets(model, settings)
    total = 0
    for name, mod in model.named_modules():
        if not re.fullmatch(pattern, name):
            continue
        if isinstance(mod, torch.nn.Linear):
            total += settings.r * (mod.in_features + mod.out_features)
        elif isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            total += mod.in_channels * settings.r * kh * kw + settings.r * mod.out_channels
    return total


def perturb(peft_model, seed: int = 0, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = get_adapter_state(peft_model)
    for key in state:
        if "lora_B" in key:
            state[key] = torch.randn(state[key].shape, generator=gen) * scale
    set_adapter_state(peft_model, state)


@pytest.mark.parametrize("name", ["tiny", "tiny-clip", "tiny-dual-hf"])
def test_trainable_count_is_exactly_what_the_config_implies(name: str) -> None:
    model = create_model(name)
    settings = LoraSettings.from_spec(model.spec["lora"])
    expected = expected_lora_params(model, settings)
    peft_model = attach_lora(model, settings)
    assert expected > 0
    assert trainable_parameter_count(peft_model) == expected


def test_modules_to_save_and_freeze_a() -> None:
    model = create_model("tiny")
    base = LoraSettings(r=2, alpha=4, targets=("image-conv",))
    lora_only = expected_lora_params(model, base)
    proj = sum(p.numel() for p in model.image_proj.parameters())
    peft_model = attach_lora(
        create_model("tiny"),
        LoraSettings(r=2, alpha=4, targets=("image-conv",), modules_to_save=("image_proj",)),
    )
    assert trainable_parameter_count(peft_model) == lora_only + proj
    ffa = attach_lora(
        create_model("tiny"), LoraSettings(r=2, targets=("image-conv",), freeze_a=True)
    )
    trainable = [n for n, p in ffa.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    frozen_lora = [n for n, p in ffa.named_parameters() if "lora_" in n and not p.requires_grad]
    assert frozen_lora and all(is_lora_a(n) for n in frozen_lora)


def test_is_lora_a_names_the_a_matrices_only() -> None:
    state = get_adapter_state(attach_lora(create_model("tiny")))
    a_keys = [k for k in state if is_lora_a(k)]
    assert a_keys and all(".lora_A." in k for k in a_keys)
    assert all(".lora_B." in k for k in state if not is_lora_a(k))
    assert not is_lora_a("base_model.model.layer.lora_B.weight")


def test_create_lora_model_is_attach_lora_with_the_run_overrides() -> None:
    built = create_lora_model("tiny", rank=2, init_seed=5, freeze_a=True)
    settings = built.fedretrieve_lora
    spec = create_model("tiny").spec["lora"]
    assert (settings.r, settings.alpha, settings.init_seed, settings.freeze_a) == (
        2,
        spec["alpha"],  # 0 = the model config's value
        5,
        True,
    )
    assert settings == LoraSettings.for_run(spec, rank=2, init_seed=5, freeze_a=True)
    by_hand = attach_lora(create_model("tiny"), settings)
    state, other = get_adapter_state(built), get_adapter_state(by_hand)
    assert lora_a_digest(state) == lora_a_digest(other)
    assert lora_a_digest(state) != lora_a_digest(
        get_adapter_state(create_lora_model("tiny", rank=2, init_seed=6, freeze_a=True))
    )


def test_same_seed_gives_the_same_a_everywhere() -> None:
    a = get_adapter_state(attach_lora(create_model("tiny")))
    b = get_adapter_state(attach_lora(create_model("tiny")))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_and_targets_are_refused() -> None:
    with pytest.raises(ConfigError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="match no"):
        attach_lora(create_model("tiny"), LoraSettings(targets=("nothing-here",)))


def test_state_checks_name_the_problem() -> None:
    peft_model = attach_lora(create_model("tiny"))
    state = get_adapter_state(peft_model)
    key = next(iter(state))
    bad = dict(state)
    bad[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(AdapterMismatch, match="NaN"):
        set_adapter_state(peft_model, bad)
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(AdapterMismatch, match="shape"):
        set_adapter_state(peft_model, bad)
    bad[key] = state[key].double()
    with pytest.raises(AdapterMismatch, match="dtype"):
        check_adapter_state(state, bad)
    with pytest.raises(AdapterMismatch, match="missing"):
        set_adapter_state(peft_model, {k: v for k, v in state.items() if k != key})
    big = {k: v + 10 for k, v in state.items()}
    with pytest.raises(AdapterMismatch, match="norm"):
        check_adapter_state(state, big, max_norm=1.0)
    # nothing was changed by the refused updates
    assert all(torch.equal(state[k], v) for k, v in get_adapter_state(peft_model).items())


@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_adapter_round_trip_and_merge_parity(name: str, tmp_path) -> None:
    peft_model = attach_lora(create_model(name))
    perturb(peft_model)
    save_adapter(peft_model, tmp_path / "adapter", round=2)
    assert {"adapter_config.json", "adapter_model.safetensors", "fedretrieve_adapter.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    assert read_manifest(tmp_path / "adapter").round == 2

    px = torch.randn(5, 3, *peft_model.get_base_model().preprocess.size)
    texts = ["a man in a grey jacket", "a woman in a red dress"]
    core = peft_model.get_base_model()
    live_img, live_txt = core.encode_image(px), core.encode_text(texts)

    loaded = load_adapter(create_model(name), tmp_path / "adapter")
    core2 = loaded.get_base_model()
    assert torch.equal(core2.encode_image(px), live_img)
    assert torch.equal(core2.encode_text(texts), live_txt)

    merged = create_model(name, adapter=tmp_path / "adapter")
    assert merged.version.startswith(create_model(name).version + "+")
    cos_i = torch.nn.functional.cosine_similarity(merged.encode_image(px), live_img)
    cos_t = torch.nn.functional.cosine_similarity(merged.encode_text(texts), live_txt)
    assert cos_i.min() > 0.9999 and cos_t.min() > 0.9999
    base_img = create_model(name).encode_image(px)
    assert not torch.allclose(base_img, live_img, atol=1e-3)  # the adapter does something
    merged_again = merge_adapter(peft_model)
    assert torch.allclose(merged_again.encode_image(px), live_img, atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path) -> None:
    save_adapter(attach_lora(create_model("tiny")), tmp_path / "a")
    with pytest.raises(AdapterMismatch, match="trained on base"):
        create_model("tiny-clip", adapter=tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterMismatch, match="checksum"):
        create_model("tiny", adapter=tmp_path / "a")
    with pytest.raises(AdapterMismatch, match="missing"):
        create_model("tiny", adapter=tmp_path / "nothing")


def test_save_adapter_replaces_atomically(tmp_path) -> None:
    p = attach_lora(create_model("tiny"))
    first = save_adapter(p, tmp_path / "a")
    perturb(p, seed=3)
    second = save_adapter(p, tmp_path / "a")
    assert first.adapter_fingerprint != second.adapter_fingerprint
    assert read_manifest(tmp_path / "a").adapter_fingerprint == second.adapter_fingerprint
    assert [x.name for x in tmp_path.iterdir()] == ["a"]  # no temp dirs left behind


def test_merged_text_adapter_never_reads_the_base_caption_cache(tmp_path) -> None:
    """A merged model keeps the base fingerprint (its adapters stay compatible), but its text
    tower is not the base's: caption features cached for the base must not answer for it."""
    from common.train import TextFeatureCache

    texts = ["a man in a grey jacket", "a woman in a red dress"]
    base = create_model("tiny")  # its LoRA targets include text-attention
    base_cache = TextFeatureCache(base.text_fingerprint)
    base_feats = base_cache.get(base, texts)
    peft_model = attach_lora(create_model("tiny"))
    perturb(peft_model)
    save_adapter(peft_model, tmp_path / "adapter")
    merged = create_model("tiny", adapter=tmp_path / "adapter")
    assert merged.fingerprint == base.fingerprint and merged.text_fingerprint != base.fingerprint
    with pytest.raises(ValueError, match="another text tower"):
        base_cache.get(merged, texts)
    own = TextFeatureCache.for_model(merged, base_cache)
    assert own is not base_cache and not torch.allclose(own.get(merged, texts), base_feats)
    with torch.no_grad():
        assert torch.allclose(own.get(merged, texts), merged.text_backbone(texts), atol=1e-5)

    # an adapter that leaves the text tower alone: the base's cache still fits
    image_only = attach_lora(create_model("tiny"), LoraSettings(targets=("image-conv",)))
    perturb(image_only)
    save_adapter(image_only, tmp_path / "image-only")
    merged_image = create_model("tiny", adapter=tmp_path / "image-only")
    assert TextFeatureCache.for_model(merged_image, base_cache) is base_cache
