"""Export with a merged adapter, the node's backend seam, the CLI, TensorRT/CUDA guards."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from common.adapters import save_adapter
from common.errors import AdapterMismatch, ConfigError, TextTowerAbsent
from common.factory import create_model
from common.lora import LoraSettings, attach_lora
from edge_node.accel.backend import load_backend
from edge_node.accel.export import export_model
from edge_node.accel.resolve import resolve_export

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
TEXTS = ["a man in a red jacket", "someone with a black cap and brown shoes", "a"]


def _images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (48, 24, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A tiny-model adapter with non-zero B, so merging visibly changes the embeddings."""
    peft_model = attach_lora(create_model("tiny"), LoraSettings(r=2, targets=("image-conv",)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("adapter") / "round-1"
    save_adapter(peft_model, out, round=1)
    return out


def test_adapter_is_merged_before_export(adapter_dir, tmp_path):
    from common.adapters import adapter_version_of
    from edge_node.accel.ort import OrtBackend

    merged = create_model("tiny", adapter=adapter_dir)
    base = create_model("tiny")
    version = adapter_version_of(adapter_dir)
    export_model(merged, tmp_path / "e", model_spec="tiny", adapter_version=version)
    backend = OrtBackend(tmp_path / "e", model_version=merged.version, adapter_version=version)
    got = backend.encode_images(_images())
    want = merged.encode_images(_images()).numpy()
    assert (got * want).sum(1).min() >= 0.9999
    assert (got * base.encode_images(_images()).numpy()).sum(1).min() < 0.999  # adapter mattered
    with pytest.raises(AdapterMismatch, match="node's adapter is none"):
        OrtBackend(tmp_path / "e", adapter_version="")  # node without the adapter refuses it


def test_node_loader_exports_once_then_reuses(adapter_dir, tmp_path):
    path, how = resolve_export(
        "tiny", adapter_dir, fmt="onnx", precision="fp32", cache_root=tmp_path
    )
    assert how == "exported at load" and path.is_relative_to(tmp_path)
    again, how = resolve_export(
        "tiny", adapter_dir, fmt="onnx", precision="fp32", cache_root=tmp_path
    )
    assert again == path and how == "cached export"
    base_path, how = resolve_export("tiny", None, fmt="onnx", precision="fp32", cache_root=tmp_path)
    assert base_path != path and how == "exported at load"  # another version, another export


def test_backend_seam_serves_a_prebuilt_export_and_refuses_a_foreign_adapter(adapter_dir, tmp_path):
    model = create_model("tiny")
    export_model(model, tmp_path / "base", model_spec="tiny")
    backend = load_backend("onnxruntime", str(tmp_path / "base"), None, "cpu")
    assert backend.name == "onnxruntime" and backend.version == model.version
    assert "pre-built export" in backend.note
    ref = model.encode_text(TEXTS).numpy()
    assert (backend.encode_text(TEXTS) * ref).sum(1).min() >= 0.9999
    with pytest.raises(AdapterMismatch, match="re-export"):
        load_backend("onnxruntime", str(tmp_path / "base"), adapter_dir, "cpu")


def test_export_command_writes_int8_with_calibration(tmp_path, capsys):
    from sims.cli import main

    crops = tmp_path / "crops"
    crops.mkdir()
    for i, img in enumerate(_images(6)):
        img.save(crops / f"{i}.png")
    out = tmp_path / "int8"
    argv = ["export", "--model", "tiny", "--out", str(out), "--precision", "int8"]
    assert main([*argv, "--calib-data", str(crops)]) == 0
    printed = capsys.readouterr().out
    assert "image static" in printed and "text" not in printed.split("INT8")[1].split(")")[0]
    assert main([*argv, "--calib-data", str(tmp_path / "nope")]) == 2
    assert "--calib-data" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; this checks its absence")
def test_tensorrt_missing_is_a_clear_error(tmp_path, capsys):
    from sims.cli import main

    assert main(["export", "--model", "tiny", "--format", "tensorrt", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sudo apt install tensorrt python3-libnvinfer" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="JetPack"):
        load_backend("tensorrt", "tiny", None, "cuda:0")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible; this checks the no-GPU message")
def test_cuda_backend_without_gpu_says_so():
    with pytest.raises(ConfigError, match=r"torch.cuda.is_available\(\) is False"):
        load_backend("cuda", "tiny", None, "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible to torch on this machine")
def test_cuda_fp16_parity_with_fp32_eager():
    model = create_model("tiny-clip")
    backend = load_backend("cuda", "tiny-clip", None, "cuda")
    assert backend.version == model.version
    assert (backend.encode_text(TEXTS) * model.encode_text(TEXTS).numpy()).sum(1).min() >= 0.999
    want = model.encode_images(_images()).numpy()
    assert (backend.encode_images(_images()) * want).sum(1).min() >= 0.999


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible to torch on this machine")
def test_cuda_backend_without_text_tower_embeds_images_only():
    full = load_backend("cuda", "tiny", None, "cuda")
    lean = load_backend("cuda", "tiny", None, "cuda", text_tower=False)
    assert lean.model.text_tower is None and not lean.text_tower
    with pytest.raises(TextTowerAbsent):
        lean.encode_text(TEXTS)
    np.testing.assert_allclose(
        lean.encode_images(_images()), full.encode_images(_images()), atol=1e-3
    )
