"""ONNX export parity: onnxruntime fp32 vs torch eager, for both model families, both towers;
manifest checks (mismatch refused, tampering detected)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from common.errors import AdapterMismatch, ConfigError
from common.factory import create_model
from edge_node.accel.export import export_model
from edge_node.accel.manifest import MANIFEST_FILE, open_export
from edge_node.accel.ort import OrtBackend

CAPTIONS = [
    "a man",
    "a woman in a red jacket, black cap and brown shoes",
    "someone with a blue backpack walking fast across the street near the station at night",
    "x",
    "a person wearing a yellow top and green trousers",
]


def _crops(n: int = 9) -> list[Image.Image]:
    """Random-coloured person-like crops of varying sizes (exercises pad/stretch resizing)."""
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        h, w = 40 + 3 * i, 20 + 2 * i
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(60, 200, 3)))
        draw = ImageDraw.Draw(img)
        draw.rectangle(
            [w // 5, h // 5, 4 * w // 5, h // 2],
            fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
        )
        draw.rectangle(
            [w // 4, h // 2, 3 * w // 4, h - 2], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
        crops.append(img)
    return crops


def _row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module", params=["tiny", "tiny-clip"])
def exported(request, tmp_path_factory):
    model = create_model(request.param).eval()
    out = tmp_path_factory.mktemp(request.param) / "onnx"
    manifest = export_model(model, out, model_spec=request.param)
    return model, out, manifest


def test_fp32_parity_both_towers(exported):
    model, out, _manifest = exported
    backend = OrtBackend(out, model_version=model.version, adapter_version="", batch_size=4)
    assert backend.version == model.version and backend.embed_dim == model.embed_dim
    crops = _crops()
    ref_img = model.encode_images(crops).numpy()
    got_img = backend.encode_images(crops)  # batches of 4: dynamic batch axis exercised
    assert got_img.shape == ref_img.shape
    assert _row_cos(got_img, ref_img).min() >= 0.9999
    ref_txt = model.encode_text(CAPTIONS).numpy()
    got_txt = backend.encode_text(CAPTIONS)  # mixed lengths: dynamic sequence axis + padding
    assert _row_cos(got_txt, ref_txt).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got_txt, axis=1), 1.0, atol=1e-4)


def test_clip_text_graph_has_no_argmax(exported):
    import onnx

    _model, out, manifest = exported
    ops = {n.op_type for n in onnx.load(str(out / manifest.graphs["text"])).graph.node}
    assert "ArgMax" not in ops  # TensorRT cannot run int64 ArgMax
    assert manifest.opset >= 17 and "LayerNormalization" in ops


def test_manifest_records_what_the_node_needs(exported):
    model, out, _manifest = exported
    data = json.loads((out / MANIFEST_FILE).read_text())
    assert data["model_version"] == model.version
    assert data["embed_dim"] == model.embed_dim
    assert data["preprocess"]["size"] == list(model.preprocess.size)
    assert data["preprocess"]["mean"] == list(model.preprocess.mean)
    assert set(data["files"]) >= {"image.onnx", "text.onnx"}
    assert all(len(v) == 64 for v in data["files"].values())


def test_mismatching_export_is_refused(exported):
    model, out, _ = exported
    with pytest.raises(AdapterMismatch, match="this node runs 'default@"):
        OrtBackend(out, model_version="default@0123456789")
    with pytest.raises(AdapterMismatch, match=r"adapter none .*node's adapter is abc"):
        OrtBackend(out, model_version=model.version, adapter_version="abc")


def test_tampered_or_foreign_directory_is_refused(exported, tmp_path):
    _, out, manifest = exported
    with pytest.raises(ConfigError, match="not a fedretrieve export"):
        open_export(tmp_path)
    bad = tmp_path / "copy"
    bad.mkdir()
    for name in (MANIFEST_FILE, *manifest.graphs.values()):
        (bad / name).write_bytes((out / name).read_bytes())
    with pytest.raises(AdapterMismatch, match="missing"):
        open_export(bad)  # tokenizer files not copied
    import shutil

    shutil.copytree(out / "tokenizer", bad / "tokenizer")
    open_export(bad)
    (bad / "image.onnx").write_bytes(b"garbage")
    with pytest.raises(AdapterMismatch, match="checksum"):
        open_export(bad)


def test_bad_settings_name_the_field(tmp_path):
    model = create_model("tiny")
    with pytest.raises(ConfigError, match="precision"):
        export_model(model, tmp_path / "x", model_spec="tiny", precision="int4")
    with pytest.raises(ConfigError, match="fp16 needs --format tensorrt"):
        export_model(model, tmp_path / "x", model_spec="tiny", precision="fp16")
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_trtexec_lines_match_the_engine_profiles(exported):
    from edge_node.accel.trt import trtexec_commands

    model, out, manifest = exported
    image, text = trtexec_commands(out, manifest)
    h, w = model.preprocess.size
    assert f"--onnx={out / 'image.onnx'}" in image and " --fp16 " in image
    assert f"--maxShapes=pixels:{manifest.max_batch}x3x{h}x{w}" in image
    length = manifest.text_max_length
    assert f"--maxShapes=input_ids:32x{length},attention_mask:32x{length}" in text
