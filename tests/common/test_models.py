"""Model factory: every family from tiny configs, one interface, normalised outputs."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import UnknownModel
from common.factory import CONFIG_DIR, create_model, list_models, save_model

TINY = ["tiny", "tiny-clip", "tiny-dual-hf"]


@pytest.mark.parametrize("name", TINY)
def test_encode_shapes_and_normalisation(name: str) -> None:
    model = create_model(name)
    texts = ["a man in a red jacket", "a woman with a black backpack", "blue jeans"]
    txt = model.encode_text(texts)
    px = torch.randn(4, 3, *model.preprocess.size)
    img = model.encode_image(px)
    assert txt.shape == (3, model.embed_dim) and img.shape == (4, model.embed_dim)
    assert txt.dtype == img.dtype == torch.float32
    assert torch.allclose(txt.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5)
    # forward gives the training view: the same embeddings plus a temperature
    model.eval()
    img_f, txt_f, scale = model(px, texts)
    assert torch.allclose(img_f, img, atol=1e-5) and torch.allclose(txt_f, txt, atol=1e-5)
    assert scale.item() > 1.0
    # different texts embed differently (the tower is actually used)
    assert not torch.allclose(txt[0], txt[1])


def test_seeded_init_gives_same_weights_and_version_in_every_process() -> None:
    a, b = create_model("tiny"), create_model("tiny")
    assert a.version == b.version
    px = torch.randn(2, 3, *a.preprocess.size)
    assert torch.equal(a.encode_image(px), b.encode_image(px))
    assert create_model("tiny-clip").version != a.version


def test_encode_images_preprocesses_pil(tiny_dataset) -> None:
    from PIL import Image

    model = create_model("tiny")
    imgs = [Image.open(p).convert("RGB") for p in sorted((tiny_dataset / "imgs").iterdir())[:3]]
    assert model.encode_images(imgs).shape == (3, model.embed_dim)


def test_save_model_round_trip(tmp_path) -> None:
    model = create_model("tiny")
    with torch.no_grad():
        model.image_proj.weight.add_(0.5)  # as if trained
    out = save_model(model, tmp_path / "base", name="tiny-base")
    again = create_model(out)
    assert again.name == "tiny-base" and again.version != model.version
    px = torch.randn(3, 3, *model.preprocess.size)
    assert torch.allclose(model.encode_image(px), again.encode_image(px), atol=1e-6)
    texts = ["a person in a green coat"]
    assert torch.allclose(model.encode_text(texts), again.encode_text(texts), atol=1e-6)
    meta = json.loads((out / "fedretrieve_model.json").read_text())
    assert "weights" not in meta["spec"]["text"]  # self-contained: no external weights


def test_stripe_pooling_widens_the_image_features(tmp_path) -> None:
    spec = json.loads((CONFIG_DIR / "tiny.json").read_text())
    spec["image"]["stripes"] = 2
    (tmp_path / "striped.json").write_text(json.dumps(spec))
    plain, striped = create_model("tiny"), create_model(tmp_path / "striped.json")
    assert striped.image_tower.width == 2 * plain.image_tower.width  # (2 + 2) vs 2 pooled maps
    px = torch.randn(2, 3, *plain.preprocess.size)
    assert striped.image_tower(px).shape == (2, striped.image_tower.width)
    assert torch.allclose(striped.encode_image(px).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_weights_that_do_not_fit_the_config_fail_clearly(tmp_path) -> None:
    out = save_model(create_model("tiny"), tmp_path / "base", name="tiny-base")
    meta = json.loads((out / "fedretrieve_model.json").read_text())
    meta["spec"]["image"]["stripes"] = 3  # e.g. saved by a version that pooled differently
    (out / "fedretrieve_model.json").write_text(json.dumps(meta))
    with pytest.raises(UnknownModel, match="weights do not fit the saved config.*image_proj"):
        create_model(out)


def test_unknown_specs_fail_clearly(tmp_path) -> None:
    with pytest.raises(UnknownModel, match="named configs"):
        create_model("no-such-model")
    with pytest.raises(UnknownModel, match="has no fedretrieve_model.json"):
        create_model(tmp_path)
    with pytest.raises(UnknownModel, match="empty model spec"):
        create_model("  ")
    assert {"default", "tiny", "clip-b16"} <= set(list_models())


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModel, match="HF_HUB_OFFLINE"):
        create_model("hf:nobody/not-a-real-clip-model")


def test_default_model_uses_the_packaged_minilm() -> None:
    model = create_model("default")
    assert model.embed_dim == 256
    assert model.text_tower.model.config.hidden_size == 384
    sims = model.text_backbone(["a red jacket", "a crimson coat", "blue shorts"])
    sims = torch.nn.functional.normalize(sims, dim=-1)
    # pretrained sentence embeddings: synonyms closer than unrelated garments
    assert sims[0] @ sims[1] > sims[0] @ sims[2]
