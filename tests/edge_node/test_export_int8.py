"""INT8 (onnxruntime quantisation) vs torch fp32: per-row cosine and the Rank-1 change on a
small generated benchmark (coloured-outfit crops with captions naming the colours)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from common.factory import create_model
from common.metrics import retrieval_metrics
from edge_node.accel.export import export_model
from edge_node.accel.ort import OrtBackend

COLOURS = {
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (30, 160, 60),
    "yellow": (230, 210, 40),
    "black": (20, 20, 20),
    "white": (235, 235, 235),
}


def _benchmark(identities: int = 10, per_id: int = 3):
    """(crops, their person ids, captions, caption person ids), fixed seed."""
    rng = np.random.default_rng(0)
    names = sorted(COLOURS)
    crops, crop_ids, captions, caption_ids = [], [], [], []
    for pid in range(identities):
        upper, lower = names[pid % 6], names[(pid // 6 + pid + 1) % 6]
        for _ in range(per_id):
            img = Image.new("RGB", (32, 64), tuple(int(v) for v in rng.integers(90, 160, 3)))
            d = ImageDraw.Draw(img)
            dx, dy = (int(v) for v in rng.integers(-2, 3, 2))
            d.rectangle([6 + dx, 13 + dy, 26 + dx, 35 + dy], fill=COLOURS[upper])
            d.rectangle([9 + dx, 35 + dy, 23 + dx, 60 + dy], fill=COLOURS[lower])
            crops.append(img)
            crop_ids.append(pid)
        captions.append(f"a person wearing a {upper} top and {lower} trousers")
        caption_ids.append(pid)
    return crops, np.array(crop_ids), captions, np.array(caption_ids)


@pytest.mark.parametrize("spec", ["tiny", "tiny-clip"])
def test_int8_close_to_fp32_and_rank1_change_reported(spec, tmp_path):
    model = create_model(spec).eval()
    crops, crop_ids, captions, caption_ids = _benchmark()
    manifest = export_model(
        model,
        tmp_path / "int8",
        model_spec=spec,
        precision="int8",
        calib_images=crops[::2],
        quantize_text=True,  # opt-in; the default keeps the text tower fp32
    )
    # CNN image towers are calibrated (static); ViT towers and text towers are dynamic
    quant = manifest.quantization
    if spec == "tiny-clip":
        assert quant["image"]["mode"] == "dynamic"
    else:
        assert quant["image"] == {"mode": "static", "calibration_images": len(crops[::2])}
    assert quant["text"]["mode"] == "dynamic"
    assert quant["text"]["kept_float"] >= 1  # FFN down-projection(s) and text_proj stay float
    backend = OrtBackend(tmp_path / "int8", model_version=model.version)
    ref_img, ref_txt = model.encode_images(crops).numpy(), model.encode_text(captions).numpy()
    got_img, got_txt = backend.encode_images(crops), backend.encode_text(captions)
    assert (got_img * ref_img).sum(1).min() >= 0.98
    assert (got_txt * ref_txt).sum(1).min() >= 0.98
    ref_sim, got_sim = ref_txt @ ref_img.T, got_txt @ got_img.T
    fp32 = retrieval_metrics(ref_sim, caption_ids, crop_ids)
    int8 = retrieval_metrics(got_sim, caption_ids, crop_ids)
    print(f"{spec}: Rank-1 fp32 {fp32['R1']:.1f} int8 {int8['R1']:.1f} (random-init model)")
    # The cosine bounds above are the real check. Rank-1 on 10 queries moves in 10-point
    # steps, and this random-init model ranks its queries by near-ties: measured, the
    # closest query of `tiny` is decided by 0.0008 of score while int8 moves scores by up
    # to 0.012 (`tiny-clip`: 0.037 vs 0.015). Both Rank-1s are equal here (10.0 -> 10.0),
    # but whether that near-tie flips depends on the CPU's int8 kernels (VNNI, AVX2, ARM
    # on a Jetson), so 0 cannot be asserted for `tiny`; one flipped query (10 points) is
    # the bound. Beyond that, Rank-1 may only move on queries whose right-vs-wrong margin
    # lies within the score change int8 caused (each side moved by at most `noise`):
    noise = float(np.abs(got_sim - ref_sim).max())
    right = crop_ids[None, :] == caption_ids[:, None]
    margin = np.abs(
        np.where(right, ref_sim, -np.inf).max(1) - np.where(right, -np.inf, ref_sim).max(1)
    )
    may_flip = int((margin <= 2 * noise).sum())
    change = abs(int8["R1"] - fp32["R1"])
    assert change <= 10.0, (fp32["R1"], int8["R1"])
    assert change <= 100.0 * may_flip / len(captions), (change, may_flip, noise)
