"""LoRA through peft: attach, get/set the adapter state that travels, merge for inference.

The adapter state (an ordered dict of tensors) is the only thing a node ever sends to the
Flower server. Every state that comes in is checked against the local adapter's keys,
shapes, dtypes and values first, because a wrong or poisoned update must fail loudly here
rather than silently corrupt a gallery index later.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from common.errors import AdapterMismatch, ConfigError
from common.model import DualEncoder


@dataclass(frozen=True)
class LoraSettings:
    """What LoRA adapts and how.

    targets: preset names (see `DualEncoder.lora_presets()`: image-conv, image-stem,
        image-attention, text-attention, text-ffn, projections) or raw regexes over module
        names. The camera shift lives in the images, so the default model adapts the image
        tower; CLIP-family configs adapt q/v attention in both towers.
    modules_to_save: modules trained in full and shipped with the adapter (e.g. image_proj).
    freeze_a: FFA-LoRA: keep A at its seeded init, train and send only B (exact FedAvg).
    init_seed: seeds A's init, so every node starts from the same A.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("image-conv",)
    modules_to_save: tuple[str, ...] = ()
    freeze_a: bool = False
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"`r` (LoRA rank) must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"`alpha` must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("`targets` is empty: LoRA would adapt nothing")

    @classmethod
    def from_spec(cls, spec: Mapping | None, **overrides) -> LoraSettings:
        data = dict(spec or {})
        data.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("targets", "modules_to_save"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def for_run(
        cls,
        spec: Mapping | None,
        *,
        rank: int = 0,
        alpha: float = 0.0,
        init_seed: int = 0,
        freeze_a: bool = False,
    ) -> LoraSettings:
        """The model config's LoRA settings with a run's overrides (rank/alpha 0: keep)."""
        return cls.from_spec(
            spec, r=rank or None, alpha=alpha or None, init_seed=init_seed, freeze_a=freeze_a
        )

    def to_dict(self) -> dict:
        return asdict(self)


def is_lora_a(key: str) -> bool:
    """Whether a parameter or adapter-state key is a LoRA A matrix (frozen under FFA-LoRA)."""
    return "lora_A" in key


def resolve_targets(model: DualEncoder, settings: LoraSettings) -> str:
    """One regex (peft full-matches it against module names) for the chosen targets."""
    presets = model.lora_presets()
    parts = [presets.get(t, t) for t in settings.targets]
    return "|".join(f"(?:{p})" for p in parts)


def attach_lora(model: DualEncoder, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter; only adapter (and modules_to_save) train."""
    settings = settings or LoraSettings.from_spec(model.spec.get("lora"))
    pattern = resolve_targets(model, settings)
    matched = [
        n
        for n, m in model.named_modules()
        if re.fullmatch(pattern, n) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    if not matched:
        raise ConfigError(
            f"LoRA targets {list(settings.targets)} match no Linear/Conv2d module "
            f"of model {model.name!r}; presets: {sorted(model.lora_presets())}"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
        bias="none",
        modules_to_save=list(settings.modules_to_save) or None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.init_seed)
        peft_model = get_peft_model(model, config)
    if settings.freeze_a:
        for name, param in peft_model.named_parameters():
            if is_lora_a(name):
                param.requires_grad_(False)
    peft_model.fedretrieve_lora = settings
    return peft_model


def get_adapter_state(peft_model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """The adapter's tensors (LoRA A/B and modules_to_save), detached CPU copies."""
    state = get_peft_model_state_dict(peft_model)
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())


def check_adapter_state(
    reference: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    allow_subset: bool = False,
    max_norm: float | None = None,
    where: str = "adapter",
) -> None:
    """Raise AdapterMismatch unless `state` fits `reference` exactly and is finite.

    Keys, then shapes, then dtypes: each message names the first few offending keys and how
    many there are, so a renamed layer or a wrong rank is obvious from one line.
    """
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if unexpected or (missing and not allow_subset):
        raise AdapterMismatch(
            f"{where}: keys differ from this model's adapter layout "
            f"({len(missing)} missing {_few(missing)}, "
            f"{len(unexpected)} unexpected {_few(unexpected)})"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        kind = type(state[not_tensors[0]]).__name__
        raise AdapterMismatch(
            f"{where}: {len(not_tensors)} value(s) are not tensors, e.g. {not_tensors[0]} is {kind}"
        )
    shapes = [k for k, v in state.items() if tuple(v.shape) != tuple(reference[k].shape)]
    if shapes:
        k = shapes[0]
        raise AdapterMismatch(
            f"{where}: {len(shapes)} tensor(s) have the wrong shape {_few(shapes)}; "
            f"{k} has shape {tuple(state[k].shape)}, expected {tuple(reference[k].shape)}"
        )
    dtypes = [k for k, v in state.items() if v.dtype != reference[k].dtype]
    if dtypes:
        k = dtypes[0]
        raise AdapterMismatch(
            f"{where}: {len(dtypes)} tensor(s) have the wrong dtype {_few(dtypes)}; "
            f"{k} has dtype {state[k].dtype}, expected {reference[k].dtype}"
        )
    total = 0.0
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise AdapterMismatch(f"{where}: {key} contains NaN or inf")
        total += float(value.double().pow(2).sum())
    if max_norm is not None and total**0.5 > max_norm:
        raise AdapterMismatch(f"{where}: L2 norm {total**0.5:.4g} exceeds the bound {max_norm}")


def _few(keys: list[str], n: int = 3) -> str:
    """The first `n` of `keys` for a message: `['a', 'b', 'c', ...]`."""
    return "[" + ", ".join(repr(k) for k in keys[:n]) + (", ...]" if len(keys) > n else "]")


def set_adapter_state(
    peft_model: PeftModel,
    state: Mapping[str, torch.Tensor],
    *,
    allow_subset: bool = False,
    where: str = "adapter",
) -> None:
    """Load `state` into the adapter after checking it (a subset only if allowed, for FFA)."""
    reference = get_peft_model_state_dict(peft_model)
    check_adapter_state(reference, state, allow_subset=allow_subset, where=where)
    merged = OrderedDict(reference)
    merged.update({k: v.to(reference[k].device) for k, v in state.items()})
    result = set_peft_model_state_dict(peft_model, merged)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise AdapterMismatch(f"{where}: peft did not take keys {unexpected[:3]}")


def merge_adapter(peft_model: PeftModel) -> DualEncoder:
    """A plain DualEncoder with the LoRA weights folded in (the adapter model is untouched)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.eval()
    return merged


def lora_parameter_count(peft_model: PeftModel) -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_digest(state: Mapping[str, torch.Tensor], keys: list[str] | None = None) -> str:
    """SHA-256 over the named tensors (sorted by key): proves two nodes share, e.g., FFA's A."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(keys if keys is not None else state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def lora_a_digest(state: Mapping[str, torch.Tensor]) -> str:
    """`adapter_digest` over the LoRA A tensors: equal on two nodes iff they share FFA's A."""
    return adapter_digest(state, [k for k in state if is_lora_a(k)])
