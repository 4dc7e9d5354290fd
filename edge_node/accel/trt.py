"""TensorRT engines for Jetsons: build them from the exported ONNX graphs, run them.

Written against TensorRT 10's Python API (JetPack 6.1+ ships TensorRT 10.3): explicit-batch
networks, `build_serialized_network`, named I/O tensors with `set_input_shape` /
`set_tensor_address` and `execute_async_v3`. Device buffers are torch CUDA tensors (JetPack's
torch has CUDA), so no pycuda / cuda-python is needed.

Precision: fp16 builds both engines with FP16 enabled; int8 builds the image engine from the
explicit Q/DQ graph that `edge_node.accel.quantize` wrote with symmetric scales from gallery crops
(TensorRT's explicit quantisation; no calibrator), and the text engine in FP16 (dynamic
quantisation ops are not TensorRT operators). TensorRT cannot be installed on the CI
machines: without it every entry point raises ConfigError with the install steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from common.adapters import adapter_version_of
from common.errors import ConfigError
from common.preprocess import PreprocessCfg, to_pixels
from edge_node.accel.backend import no_text_tower
from edge_node.accel.manifest import (
    IMAGE_INPUTS,
    OUTPUT,
    TEXT_INPUTS,
    ExportManifest,
    open_export,
)
from edge_node.accel.resolve import resolve_export

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not importable from this Python. On a Jetson it comes with JetPack: "
    "`sudo apt install tensorrt python3-libnvinfer` (JetPack 6.1+ for TensorRT 10), then run "
    "fedretrieve with JetPack's python3 (a venv needs --system-site-packages to see it). "
    'On an x86 GPU machine: `pip install tensorrt`. Otherwise choose backend = "cuda" or '
    '"onnxruntime"; docs/acceleration.md lists the equivalent trtexec commands.'
)
WORKSPACE_BYTES = 1 << 30


def import_tensorrt():
    """`tensorrt`, or ConfigError saying how to get it (never a bare ImportError)."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ConfigError(INSTALL_HINT) from err
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise ConfigError(
            f"TensorRT {trt.__version__} found; this code uses the TensorRT 10 API "
            "(JetPack 6.1 or newer). Use trtexec as in docs/acceleration.md, or backend = cuda."
        )
    return trt


def _profile_shapes(name: str, manifest: ExportManifest) -> tuple[tuple, tuple, tuple]:
    b = manifest.max_batch
    if name == "pixels":
        h, w = manifest.input_size
        return (1, 3, h, w), (b, 3, h, w), (b, 3, h, w)
    length = manifest.text_max_length
    return (1, 1), (b, min(32, length)), (b, length)


def trtexec_commands(
    export_dir: Path, manifest: ExportManifest, precision: str = "fp16"
) -> list[str]:
    """The trtexec lines that build (and time) the same engines as `build_engines` from
    an ONNX export, for a Jetson where only the command-line tools are at hand."""
    flags = {"fp32": "", "fp16": " --fp16", "int8": " --fp16 --int8"}[precision]
    lines = []
    for tower, graph in manifest.graphs.items():
        names = IMAGE_INPUTS if tower == "image" else TEXT_INPUTS
        shapes = []
        for label, index in (("min", 0), ("opt", 1), ("max", 2)):
            dims = ",".join(
                f"{n}:{'x'.join(str(d) for d in _profile_shapes(n, manifest)[index])}"
                for n in names
            )
            shapes.append(f"--{label}Shapes={dims}")
        lines.append(
            f"/usr/src/tensorrt/bin/trtexec --onnx={export_dir / graph} "
            f"--saveEngine={export_dir / (tower + '.plan')}{flags} "
            + " ".join(shapes)
            + f" --memPoolSize=workspace:{WORKSPACE_BYTES >> 20}M"
        )
    return lines


def build_engines(root: Path, manifest: ExportManifest) -> dict[str, str]:
    """Build one serialized engine per tower next to its ONNX graph; returns tower -> file.
    Engines are specific to the GPU and TensorRT version that built them: build on the
    Jetson that will run them."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engines = {}
    for tower, graph in manifest.graphs.items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(root / graph)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigError(f"TensorRT could not parse {graph}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if manifest.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if manifest.precision == "int8" and manifest.quantization.get(tower):
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            profile.set_shape(name, *_profile_shapes(name, manifest))
        config.add_optimization_profile(profile)
        log.info("building the %s TensorRT engine (%s); this takes minutes", tower, graph)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ConfigError(f"TensorRT failed to build the {tower} engine (see its log above)")
        engine_file = f"{tower}.plan"
        (root / engine_file).write_bytes(bytes(serialized))
        engines[tower] = engine_file
    return engines


class TrtBackend:
    """Runs the two engines of a `--format tensorrt` export; same interface as TorchBackend."""

    name = "tensorrt"

    def __init__(
        self,
        export_dir: str | Path,
        *,
        model_version: str | None = None,
        adapter_version: str | None = None,
        device: str = "cuda:0",
        note: str = "",
        text_tower: bool = True,
    ) -> None:
        """`text_tower` False: the text engine and the tokenizer are not loaded."""
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "backend tensorrt needs a CUDA GPU; torch.cuda.is_available() is False"
            )
        self._torch = torch
        self.export_dir = Path(export_dir)
        self.manifest = open_export(
            self.export_dir,
            model_version=model_version,
            adapter_version=adapter_version,
            fmt="tensorrt",
        )
        m = self.manifest
        self.version, self.adapter_version, self.embed_dim = (
            m.model_version, m.adapter_version, m.embed_dim,
        )  # fmt: skip
        self.query_version = m.query_version
        self.note = note or f"tensorrt {m.precision} engines {self.export_dir}"
        self.device = torch.device(device if device.startswith("cuda") else "cuda:0")
        self.preprocess = PreprocessCfg.from_dict(m.preprocess)
        self.text_tower = text_tower
        self.tokenizer = None
        if text_tower:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.export_dir / "tokenizer"))
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._engines, self._contexts = {}, {}
        for tower, engine_file in m.graphs.items():
            if tower == "text" and not text_tower:
                continue
            engine = runtime.deserialize_cuda_engine((self.export_dir / engine_file).read_bytes())
            if engine is None:
                raise ConfigError(
                    f"{engine_file} was built by another TensorRT version or GPU; rebuild it "
                    "on this device with `fedretrieve export --format tensorrt`"
                )
            self._engines[tower] = engine
            self._contexts[tower] = engine.create_execution_context()
        self._trt = trt
        self._stream = torch.cuda.Stream(self.device)

    def _run(self, tower: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        engine, ctx = self._engines[tower], self._contexts[tower]
        keep = []
        with torch.cuda.stream(self._stream):
            for name, array in feeds.items():
                dtype = _torch_dtype(self._trt, engine.get_tensor_dtype(name))
                tensor = torch.from_numpy(array).to(self.device, dtype=dtype).contiguous()
                ctx.set_input_shape(name, tuple(tensor.shape))
                ctx.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            shape = tuple(ctx.get_tensor_shape(OUTPUT))
            dtype = _torch_dtype(self._trt, engine.get_tensor_dtype(OUTPUT))
            out = torch.empty(shape, dtype=dtype, device=self.device)
            ctx.set_tensor_address(OUTPUT, out.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT {tower} engine failed to execute")
        self._stream.synchronize()
        return out.float().cpu().numpy()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise no_text_tower(self.name)
        out = [np.empty((0, self.embed_dim), np.float32)]
        step = self.manifest.max_batch
        for i in range(0, len(texts), step):
            enc = self.tokenizer(
                list(texts[i : i + step]),
                padding=True,
                truncation=True,
                max_length=self.manifest.text_max_length,
                return_tensors="np",
            )
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            out.append(self._run("text", feeds))
        return _unit_rows(np.concatenate(out))

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        out = [np.empty((0, self.embed_dim), np.float32)]
        step = self.manifest.max_batch
        for i in range(0, len(images), step):
            pixels = to_pixels(list(images[i : i + step]), self.preprocess)
            out.append(self._run("image", {"pixels": pixels}))
        return _unit_rows(np.concatenate(out))


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    return table[dtype]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Re-normalise in fp32: FP16 engines leave rows a few 1e-4 away from unit length."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


require = import_tensorrt  # registry hook: fail fast, with the install steps
finish_export = build_engines  # registry hook: the step after the ONNX graphs


def load(
    model_spec: str, adapter: Path | None = None, device: str = "cuda:0", *, text_tower: bool = True
) -> TrtBackend:
    import_tensorrt()  # fail fast, with the install steps, before exporting anything
    path, how = resolve_export(model_spec, adapter, fmt="tensorrt", precision="fp16")
    backend = TrtBackend(
        path, adapter_version=adapter_version_of(adapter), device=device, text_tower=text_tower
    )
    backend.note = f"tensorrt {backend.manifest.precision}, {how}: {path}"
    return backend
