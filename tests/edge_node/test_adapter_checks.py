"""Adapters are checked before they serve (issue 17, items 6-8).

6. The load-time probe runs both towers, for the eager and the exported backend: an adapter
   whose image tower gives NaN (finite but huge weights) is refused, and a node offered it
   keeps serving its current pair and says why in Status.
7. The saved tensors are compared with the base model's expected adapter layout (the base
   model wrapped with the adapter's own LoraConfig): renamed, missing, reshaped or retyped
   tensors are refused with the first offending keys and their count.
8. A refused adapter directory completed in place later (a `cp -r` that wrote the manifest
   before the weights) is tried again and swapped to, without a restart.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from node_fixtures import AUTH, gallery_items, ingest
from safetensors.torch import load_file, save_file

from common.adapters import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    WEIGHTS_FILE,
    load_adapter,
    save_adapter,
)
from common.errors import AdapterMismatch
from common.factory import create_model
from common.lora import attach_lora
from edge_node.accel.backend import load_backend
from protos import node_pb2

pytestmark = pytest.mark.timeout(180)

QUERY = "a person in a green top"


def huge_image_adapter(out: Path, magnitude: float = 1e30) -> Path:
    """A tiny-model adapter whose image-tower LoRA B is `magnitude` (finite, saved and
    checksummed like any other); its text tower is untouched, so a text-only probe passes it.
    1e30 gives NaN image embeddings in torch; the ONNX graph survives up to about 1e36 and
    gives NaN at 3e38 (still a finite float32)."""
    peft_model = attach_lora(create_model("tiny"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and "image" in name:
                param.fill_(magnitude)
    save_adapter(peft_model, out, round=5)
    return out


def rewrite_weights(adapter: Path, edit) -> None:
    """Apply `edit(state) -> state` to the saved tensors and re-sign the manifest, so only
    the layout check (not the checksum) can catch what `edit` did."""
    state = edit(load_file(str(adapter / WEIGHTS_FILE)))
    save_file(state, str(adapter / WEIGHTS_FILE))
    manifest = json.loads((adapter / MANIFEST_FILE).read_text())
    manifest["adapter_fingerprint"] = hashlib.sha256(
        (adapter / WEIGHTS_FILE).read_bytes()
    ).hexdigest()
    (adapter / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture
def good_adapter(tmp_path: Path, write_adapter) -> Path:
    write_adapter(tmp_path / "good", round_=1)
    return tmp_path / "good"


# ------------------------------------------------------------------ 6: both towers probed
@pytest.mark.parametrize(
    ("backend", "magnitude"), [("torch", 1e30), ("torch", 3e38), ("onnxruntime", 3e38)]
)
def test_probe_refuses_an_adapter_that_breaks_only_the_image_tower(
    backend, magnitude, tmp_path, monkeypatch
):
    # the onnxruntime backend exports at load: into this test's folder, not ~/.cache
    monkeypatch.setattr("edge_node.accel.resolve.DEFAULT_CACHE", tmp_path / "exports")
    adapter = huge_image_adapter(tmp_path / "huge", magnitude)
    text = create_model("tiny", adapter=adapter).encode_text([QUERY]).numpy()
    assert np.isfinite(text).all()  # what a text-only probe saw: nothing wrong
    with pytest.raises(AdapterMismatch, match="image tower") as info:
        load_backend(backend, "tiny", adapter)
    message = str(info.value)
    assert "NaN or inf" in message and str(adapter) in message and "\n" not in message
    assert load_backend(backend, "tiny", None).embed_dim == 32  # the base model still loads


def test_node_keeps_serving_and_says_why_when_the_image_tower_breaks(serve_node, write_adapter):
    served = serve_node(adapter_poll_s=3600.0)  # the test drives the watcher itself
    ingest(served, gallery_items(8))
    adapters = served.config.adapter_dir
    good_version = write_adapter(adapters / "round-1", round_=1)
    assert served.node.check_adapter()
    assert served.node.active.version == good_version

    huge_image_adapter(adapters / ".staging")
    shutil.move(adapters / ".staging", adapters / "round-2")  # newer round, moved in whole
    assert not served.node.check_adapter()
    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)
    assert status.model_version == good_version
    assert "round-2" in status.backend_note and "image tower" in status.backend_note
    for _ in range(3):  # the old pair answers, with real hits
        reply = served.stub.Search(
            node_pb2.SearchRequest(text=QUERY, k=5), metadata=AUTH, timeout=10
        )
        assert reply.model_version == good_version and len(reply.hits) == 5
        assert np.isfinite([h.score for h in reply.hits]).all()
    assert not served.node.check_adapter()  # unchanged: not tried again


# ------------------------------------------------------------------ 7: expected layout
def _rename_first_lora(state: dict) -> dict:
    key = next(k for k in sorted(state) if "lora_A" in k)
    state[key.replace("lora_A", "lora_Z")] = state.pop(key)
    return state


def _drop_two(state: dict) -> dict:
    for key in sorted(state)[:2]:
        del state[key]
    return state


def _half_precision(state: dict) -> dict:
    return {k: v.half() if "lora_B" in k else v for k, v in state.items()}


def _wrong_rank(state: dict) -> dict:
    key = next(k for k in sorted(state) if "lora_A" in k)
    state[key] = torch.zeros((state[key].shape[0] + 1, *state[key].shape[1:]))
    return state


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_rename_first_lora, ["1 missing", "1 unexpected", "lora_Z"]),
        (_drop_two, ["2 missing", "0 unexpected"]),
        (_half_precision, ["wrong dtype", "torch.float16", "expected torch.float32"]),
        (_wrong_rank, ["1 tensor(s) have the wrong shape", "lora_A"]),
    ],
    ids=["renamed", "missing", "dtype", "shape"],
)
def test_saved_tensors_must_match_the_expected_layout(good_adapter, edit, needles):
    rewrite_weights(good_adapter, edit)
    with pytest.raises(AdapterMismatch) as info:
        load_adapter(create_model("tiny"), good_adapter)
    message = str(info.value)
    assert all(n in message for n in needles), message
    assert str(good_adapter) in message and "\n" not in message


def test_many_offending_keys_are_counted_not_all_listed(good_adapter):
    rewrite_weights(
        good_adapter, lambda s: {k.replace("lora_", "lora_old_"): v for k, v in s.items()}
    )
    with pytest.raises(AdapterMismatch) as info:
        load_adapter(create_model("tiny"), good_adapter)
    message = str(info.value)
    n = len(load_file(str(good_adapter / WEIGHTS_FILE)))
    assert f"{n} missing" in message and f"{n} unexpected" in message
    assert message.count("lora_old_") == 3 and "...]" in message  # first three, then "..."


def test_an_intact_adapter_still_loads(good_adapter):
    peft_model = load_adapter(create_model("tiny"), good_adapter)
    assert peft_model.fedretrieve_manifest.round == 1


# ------------------------------------------------------------------ 8: retried when completed
def test_adapter_completed_in_place_after_a_refusal_is_picked_up(
    serve_node, write_adapter, tmp_path
):
    served = serve_node(adapter_poll_s=3600.0)
    ingest(served, gallery_items(6))
    base_version = served.node.active.version
    source = tmp_path / "final"
    new_version = write_adapter(source, round_=3)

    # `cp -r` as the watcher may see it: the manifest and config first, weights half-written
    target = served.config.adapter_dir / "round-3"
    target.mkdir(parents=True)
    for name in (MANIFEST_FILE, PEFT_CONFIG_FILE):
        shutil.copy2(source / name, target / name)
    weights = (source / WEIGHTS_FILE).read_bytes()
    (target / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    assert not served.node.check_adapter()
    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)
    assert status.model_version == base_version
    assert str(target) in status.backend_note and "checksum" in status.backend_note
    assert not served.node.check_adapter()  # unchanged since the refusal: not retried

    (target / WEIGHTS_FILE).write_bytes(weights)  # the copy finishes
    assert served.node.check_adapter()
    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)
    assert status.model_version == new_version
    assert "refused" not in status.backend_note
