"""INT8 quantisation of exported graphs with onnxruntime's own tools.

Why two modes: dynamic quantisation (weights int8, activation scales computed per batch at
run time) needs no data and suits the transformer text tower; static quantisation fixes
activation scales from calibration crops, which is what makes convolutions fast (fused
QLinearConv on CPU) and is the explicit Q/DQ form TensorRT builds INT8 engines from.
The calibration crops should be the node's own gallery crops: scales then match the
cameras the node actually serves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import ConfigError
from common.preprocess import PreprocessCfg, to_batch

log = logging.getLogger(__name__)

CALIB_BATCH = 8
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")


class CropCalibrationReader:
    """Feeds preprocessed crops to onnxruntime's calibrator, a few at a time."""

    def __init__(self, images: Sequence[Image.Image], cfg: PreprocessCfg, batch: int = CALIB_BATCH):
        self._batches = [
            to_batch(list(images[i : i + batch]), cfg).numpy() for i in range(0, len(images), batch)
        ]
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._batches):
            return None
        self._pos += 1
        return {"pixels": self._batches[self._pos - 1]}

    def rewind(self) -> None:
        self._pos = 0


@contextmanager
def _quiet_root_info() -> Iterator[None]:
    """onnxruntime.quantization logs one INFO line per tensor on the root logger (hundreds
    per graph); hold INFO back while it runs, then restore whatever was set before."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.INFO))
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_dynamic_graph(src: Path, dst: Path, *, keep_reducing: bool = True) -> list[str]:
    """Dynamic INT8 of the MatMul/Gemm weights (per output channel), with
    `keep_reducing` keeping the width-reducing ones in float; returns the names kept float.

    Why: on the pretrained all-MiniLM-L6-v2 text tower, onnxruntime's defaults (per-tensor,
    every MatMul and Gather) gave a worst-row cosine of 0.906; per-channel weights 0.979;
    also keeping the FFN down-projections float (their post-GELU inputs carry the outliers
    that int8 clips) 0.989, at the same speed on 2 cores. The projection head into the
    shared space always stays float: one small matmul per crop, and its error lands on the
    embedding unfiltered (tiny-clip's ViT image tower, onnxruntime 1.32: worst-row cosine
    0.978 all int8, 0.999 with `image_proj` float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = float_matmuls(src, keep_reducing=keep_reducing)
    with _quiet_root_info():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=keep,
        )
    return keep


def float_matmuls(graph: Path, *, keep_reducing: bool) -> list[str]:
    """MatMul/Gemm nodes to keep float: the projection head (`image_proj`, `text_proj` in
    our export) always, and with `keep_reducing` every one whose weight maps more inputs
    to fewer outputs (FFN down-projections, output projections)."""
    import onnx

    model = onnx.load(str(graph))
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm")
        and (
            node.name.startswith(("/image_proj/", "/text_proj/"))
            or (keep_reducing and _reduces_width(node, weights))
        )
    ]


def _reduces_width(node, weights: dict[str, tuple[int, ...]]) -> bool:
    dims = weights.get(node.input[1]) if len(node.input) >= 2 else None
    if dims is None or len(dims) != 2:
        return False
    transposed = node.op_type == "Gemm" and any(
        a.name == "transB" and a.i == 1 for a in node.attribute
    )
    n_in, n_out = (dims[1], dims[0]) if transposed else dims
    return n_in > n_out


def quantize_static_graph(
    src: Path,
    dst: Path,
    images: Sequence[Image.Image],
    cfg: PreprocessCfg,
    *,
    symmetric: bool = False,
) -> None:
    """Static quantisation for convolutional towers (on a ViT it cost 0.03 cosine; those
    get dynamic quantisation instead, see `is_convolutional`).
    `symmetric`: explicit Q/DQ on the weighted ops (Conv, MatMul, Gemm) with int8
    activations and zero point 0, the only kind TensorRT accepts. Otherwise onnxruntime's
    default op set in QOperator form (fused QLinearConv) with uint8 activations: the
    fastest on x86 CPUs (measured 1.3x the QDQ form on the default CNN)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not images:
        raise ConfigError("static INT8 quantisation needs calibration images (--calib-data)")
    with _quiet_root_info():
        quantize_static(
            str(src),
            str(dst),
            CropCalibrationReader(images, cfg),
            quant_format=QuantFormat.QDQ if symmetric else QuantFormat.QOperator,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(WEIGHTED_OPS) if symmetric else None,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )


def is_convolutional(graph: Path) -> bool:
    """More Conv than MatMul/Gemm nodes: static quantisation pays off (fused QLinearConv);
    for transformers, dynamic MatMulInteger was both faster (1.6x) and closer to fp32."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node]
    return ops.count("Conv") > ops.count("MatMul") + ops.count("Gemm")


def quantize_export(
    root: Path,
    graphs: dict[str, str],
    cfg: PreprocessCfg,
    calib_images: Sequence[Image.Image] | None,
    *,
    symmetric: bool = False,
    text: bool = False,
) -> dict[str, dict]:
    """Quantise the fp32 graphs in `root` in place; returns what was done, per tower, for
    the manifest. Image: static when calibration crops are given and the tower is
    convolutional, else dynamic.
    `symmetric` (for TensorRT): the image graph gets explicit symmetric Q/DQ (calibration
    crops required) and the text graph stays float, since TensorRT has no operator for
    onnxruntime's dynamic quantisation; its engine is built in FP16.
    `text`: also quantise the text graph (opt-in). Measured on the pretrained default base
    (128 caption queries): INT8 image tower Rank-1 +0.0, INT8 text tower -2.3 points; the
    gallery (image) side is where the time goes, one caption per query is cheap."""
    if symmetric and not calib_images:
        raise ConfigError(
            "TensorRT INT8 needs calibration crops for explicit Q/DQ scales: pass "
            "--calib-data DIR (a few hundred of the node's gallery crops)"
        )
    done: dict[str, dict] = {}
    for tower, name in graphs.items():
        if tower == "text" and (symmetric or not text):
            continue
        src = root / name
        tmp = root / f"{src.stem}.int8.onnx"
        if tower == "image" and calib_images and (symmetric or is_convolutional(src)):
            quantize_static_graph(src, tmp, calib_images, cfg, symmetric=symmetric)
            done[tower] = {"mode": "static", "calibration_images": len(calib_images)}
        else:
            # text: keep down-projections float (measured on pretrained MiniLM); ViT image
            # towers: all int8 but the projection head (0.9999 worst-row cosine on clip-b16,
            # 1.3-1.4x faster than keeping the down-projections float; not measured on real
            # CLIP weights, none exist offline)
            kept = quantize_dynamic_graph(src, tmp, keep_reducing=(tower == "text"))
            done[tower] = {"mode": "dynamic", "kept_float": len(kept)}
        tmp.replace(src)
        log.info("quantised %s graph to INT8 (%s)", tower, done[tower]["mode"])
    return done
