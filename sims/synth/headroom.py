"""Does the benchmark measure what it must? The issue's acceptance figures, in one run.

1. the base model on held-out *source* identities (neutral cameras),
2. the base model zero-shot on the shifted *target* test split, without and with per-camera
   camera normalisation (gains + levels: the label-free baseline a learned gain must beat),
   and with the stronger statistics matches of `sims.synth.sceptics` (hue alignment, colour
   moments), so a loophole of the next kind shows in the same run,
3. a centralised LoRA fine-tune (the default model's LoRA settings) on all nodes' target
   train data, evaluated on the same target test split.
A useful benchmark has (3) well above (2) (the camera shift is real and learnable) and
(3) below saturation. Run: `python -m sims.synth.headroom --data DIR --model MODEL_DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from common.camera_norm import gallery_camera_norm
from common.datasets import load_records
from common.errors import DatasetError
from sims.synth.sceptics import fit_sceptics

log = logging.getLogger(__name__)
KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def _round(metrics: dict) -> dict:
    return {k: round(float(metrics[k]), 2) for k in KEYS} | {
        "queries": int(metrics["queries"]),
        "gallery": int(metrics["gallery"]),
    }


def _camera_looks(data_dir: Path) -> dict[str, str]:
    path = data_dir / "cameras.json"
    if not path.is_file():
        return {}
    return {c: info.get("look", "") for c, info in json.loads(path.read_text()).items()}


def measure_headroom(
    data_dir: str | Path,
    base_model: str | Path,
    *,
    epochs: int = 8,
    lr: float = 4e-3,
    holdout: float = 0.15,
    seed: int = 0,
    per_camera: bool = True,
    progress: bool = False,
) -> dict:
    from common.evaluate import evaluate
    from common.factory import create_model
    from common.lora import LoraSettings, attach_lora, trainable_parameter_count
    from common.train import ImageBank, TextFeatureCache, TrainConfig, train
    from sims.pretrain import source_records, split_source

    train_recs = load_records(data_dir, split="train")
    test_recs = load_records(data_dir, split="test")
    if not train_recs or not test_recs:
        raise DatasetError(f"{data_dir}: needs non-empty train and test splits")
    sources = source_records(data_dir)
    _, held = split_source(sources, holdout, seed)
    model = create_model(base_model)
    looks = _camera_looks(Path(data_dir))
    cache = TextFeatureCache(model.text_fingerprint)
    bank = ImageBank(test_recs, model.preprocess)
    out: dict = {"model": model.version, "data": str(data_dir)}
    out["source_test"] = _round(evaluate(model, held, text_cache=cache))
    out["target_zero_shot"] = _round(evaluate(model, test_recs, text_cache=cache, bank=bank))
    norm = gallery_camera_norm(test_recs)  # label-free: each camera's own test gallery
    normed = ImageBank(test_recs, model.preprocess, norm)
    out["target_zero_shot_camera_norm"] = _round(
        evaluate(model, test_recs, text_cache=cache, bank=normed)
    )
    sceptic_r1 = {}
    for name, match in fit_sceptics(test_recs, sources).items():
        bank_s = ImageBank(test_recs, model.preprocess, match)
        sceptic_r1[name] = round(
            float(evaluate(model, test_recs, text_cache=cache, bank=bank_s)["R1"]), 2
        )
    cams = sorted({r.camera_id for r in test_recs}) if per_camera else []
    by_cam = {c: [r for r in test_recs if r.camera_id == c] for c in cams}

    def per_cam(m, b) -> dict[str, float]:
        return {
            c: round(evaluate(m, rs, text_cache=cache, bank=b)["R1"], 2) for c, rs in by_cam.items()
        }

    per_look = {
        c: {"look": looks.get(c, ""), "zero_shot": r1} for c, r1 in per_cam(model, bank).items()
    }
    for c, r1 in per_cam(model, normed).items():
        per_look[c]["zero_shot_camera_norm"] = r1
    settings = LoraSettings.from_spec(model.spec.get("lora"))
    peft_model = attach_lora(model, settings)
    start = time.perf_counter()
    result = train(
        peft_model,
        train_recs,
        TrainConfig(epochs=epochs, lr=lr, seed=seed, progress=progress),
        text_cache=cache,
        desc="centralised-lora",
    )
    out["centralised_lora"] = _round(evaluate(peft_model, test_recs, text_cache=cache, bank=bank))
    for c, r1 in per_cam(peft_model, bank).items():
        per_look[c]["centralised_lora"] = r1
    out["per_camera_R1"] = per_look
    out["lora"] = {
        "settings": settings.to_dict(),
        "trainable_parameters": trainable_parameter_count(peft_model),
        "epochs": epochs,
        "lr": lr,
        "losses": [round(x, 4) for x in result.losses],
        "seconds": round(time.perf_counter() - start, 1),
        "train_images": len(train_recs),
    }
    gain = out["centralised_lora"]["R1"] - out["target_zero_shot"]["R1"]
    recovered = out["target_zero_shot_camera_norm"]["R1"] - out["target_zero_shot"]["R1"]
    out["lora_gain_R1"] = round(gain, 2)
    out["camera_norm_gain_R1"] = round(recovered, 2)
    zero = out["target_zero_shot"]["R1"]
    out["sceptics_R1"] = sceptic_r1
    strongest = max([recovered, *(r1 - zero for r1 in sceptic_r1.values())])
    out["acceptance"] = {
        "gain_at_least_12": gain >= 12.0,
        "camera_norm_recovers_at_most_a_third": recovered <= gain / 3,
        "not_saturated_below_90": out["centralised_lora"]["R1"] < 90.0,
        # not issue 13's bar, the honesty check beside it: no label-free statistic we know of
        # explains the gain either
        "strongest_sceptic_recovers_at_most_a_third": strongest <= gain / 3,
    }
    return out


def look_table(report: dict) -> str:
    """The per-look table of docs/benchmark.md, from a `measure_headroom` report."""
    rows = [
        "| camera | look | zero-shot R1 | + camera norm | centralised LoRA |",
        "|---|---|---|---|---|",
    ]
    for cam, r in report.get("per_camera_R1", {}).items():
        rows.append(
            f"| {cam} | {r['look']} | {r['zero_shot']:.2f} | {r['zero_shot_camera_norm']:.2f} "
            f"| {r['centralised_lora']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--model", required=True, help="base model dir (fedretrieve pretrain)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report = measure_headroom(args.data, args.model, epochs=args.epochs, lr=args.lr)
    text = json.dumps(report, indent=2)
    print(text)
    print(look_table(report))
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
