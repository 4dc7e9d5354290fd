"""`fedretrieve export`: merge an adapter, export ONNX graphs or TensorRT engines + manifest.

Registered by `edge_node/cli.py` through `register_export(subparsers)`; heavy imports happen
in the handler so `fedretrieve --help` stays fast on a Jetson.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_node.accel.manifest import DEFAULT_OPSET, EXPORTERS, PRECISIONS
from edge_node.accel.registry import BACKENDS, EXPORT_FORMATS


def register_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the model (adapter merged) as ONNX graphs or TensorRT engines",
        description="Merge the LoRA adapter, export the image and text towers as separate "
        "ONNX graphs with a manifest, optionally INT8-quantised or built into TensorRT "
        "engines (see docs/acceleration.md).",
    )
    p.add_argument("--model", required=True, help="config name, model directory or hf:<id>")
    p.add_argument("--adapter", type=Path, default=None, help="adapter directory to merge in")
    p.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", required=True, type=Path, help="export directory (replaced)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="default: fp32 for onnx, fp16 for tensorrt",
    )
    p.add_argument("--max-batch", type=int, default=32, help="largest batch (TensorRT profile)")
    p.add_argument(
        "--calib-data",
        type=Path,
        default=None,
        help="folder of gallery crops for static INT8 scales (required for tensorrt int8)",
    )
    p.add_argument("--calib-images", type=int, default=256, help="crops used for calibration")
    p.add_argument(
        "--int8-text",
        action="store_true",
        help="also quantise the text tower (faster queries; cost 2.3 Rank-1 points measured)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="torchscript",
        help="torch.onnx exporter (torchscript: fast, TensorRT-proven; dynamo: torch.export)",
    )
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from common.adapters import adapter_version_of
    from common.factory import create_model
    from edge_node.accel.export import export_model, load_calibration_images
    from edge_node.accel.registry import format_module

    default = next(e.precision for e in BACKENDS.values() if e.export_format == args.fmt)
    precision = args.precision or default
    require = getattr(format_module(args.fmt), "require", None)
    if require is not None:
        require()  # fail before the slow part, with the install steps
    calib = None
    if args.calib_data is not None:
        calib = load_calibration_images(args.calib_data, limit=args.calib_images)
    model = create_model(args.model, adapter=args.adapter)
    manifest = export_model(
        model,
        args.out,
        model_spec=args.model,
        adapter_version=adapter_version_of(args.adapter),
        fmt=args.fmt,
        precision=precision,
        max_batch=args.max_batch,
        calib_images=calib,
        opset=args.opset,
        exporter=args.exporter,
        quantize_text=args.int8_text,
    )
    quant = ", ".join(f"{t} {q['mode']}" for t, q in manifest.quantization.items())
    print(
        f"exported {manifest.model_version} ({manifest.format} {manifest.precision}"
        f"{'; INT8 ' + quant if quant else ''}) to {args.out}: "
        + ", ".join(f"{t}={f}" for t, f in manifest.graphs.items())
    )
    if manifest.format == "onnx" and manifest.precision == "fp32":
        from edge_node.accel.trt import trtexec_commands

        print("equivalent TensorRT FP16 engines on a Jetson (trtexec):")
        for line in trtexec_commands(args.out, manifest):
            print("  " + line)
    return 0
