"""`fedretrieve bench embed --json OUT`: embedding throughput per backend, memory, parity, Rank-1.

What it answers: how much faster is a node's heaviest work (embedding crops, and captions)
with onnxruntime fp32 / INT8 than with PyTorch eager, at what memory cost, and what INT8
does to retrieval. Every (model, backend) runs in its own child process, so resident memory
is that backend's alone (Python + libraries + weights) and backends do not warm each other's
caches; torch eager is measured in the same run, so the ratios compare like with like.
Images are timed from normalised pixels (model work only; PIL preprocessing is the same for
every backend); texts include tokenisation. With a CUDA GPU, `cuda` (fp16 autocast) and
`cuda-fp32` (eager on the GPU) are added without edits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sims.bench.workload import run_in_child, sample_captions

# onnxruntime-int8: INT8 image tower, fp32 text (what `--precision int8` exports);
# onnxruntime-int8-text: both towers INT8 (`--int8-text`)
CPU_BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-int8-text")
EXPORTS = {"onnxruntime": "fp32", "onnxruntime-int8": "int8", "onnxruntime-int8-text": "int8-text"}
GPU_BACKENDS = ("cuda-fp32", "cuda")
PARITY_ITEMS = 16


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("embed", help="embedding throughput: torch vs onnxruntime")
    p.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    p.add_argument("--models", default="default,clip-b16", help="model specs (comma list)")
    p.add_argument("--batches", default="1,32", help="batch sizes (comma list)")
    p.add_argument("--iters", type=int, default=10, help="timed batches per measurement")
    p.add_argument(
        "--repeats", type=int, default=1, help="passes over all backends; median per cell"
    )
    p.add_argument("--large-iters", type=int, default=2, help="timed batches for CLIP-size models")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    p.add_argument("--backends", default="", help="subset of backends (default: all available)")
    p.add_argument("--rank-data", type=Path, default=None, help="synth dataset for Rank-1")
    p.add_argument("--rank-model", default="default", help="model whose Rank-1 change is measured")
    p.add_argument("--work", type=Path, default=None, help="keep exports here (default: temp)")
    p.set_defaults(func=main)


# ---------------------------------------------------------------------- inputs
def sample_crops(n: int, size: tuple[int, int], seed: int = 0):
    """Person-like crops (coloured blocks + noise): realistic activation ranges for INT8."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(n):
        a = np.empty((h, w, 3), np.float32)
        a[:] = rng.integers(60, 200, 3)
        a[h // 6 : h // 2, w // 5 : 4 * w // 5] = rng.integers(0, 256, 3)
        a[h // 2 : h - 2, w // 4 : 3 * w // 4] = rng.integers(0, 256, 3)
        a += rng.normal(0, 12, a.shape)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def _rss_mb(field: str = "VmRSS") -> float:
    """Resident MB now (VmRSS) or at peak (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork + exec, so each child reports its own peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------- child
def _load(backend: str, spec: str, export_dir: str | None, threads: int):
    """-> (encode_pixels, encode_text, encode_images) for one backend."""
    import torch

    torch.set_num_threads(threads)
    if backend.startswith("onnxruntime"):
        from edge_node.accel.ort import OrtBackend

        b = OrtBackend(export_dir, threads=threads, batch_size=1 << 16)
        return b.encode_pixels, b.encode_text, b.encode_images
    from common.factory import create_model

    if backend == "torch":
        model = create_model(spec).eval()
        return (
            lambda px: model.encode_image(torch.from_numpy(px), batch_size=1 << 16).numpy(),
            lambda texts: model.encode_text(texts, batch_size=1 << 16).numpy(),
            lambda images: model.encode_images(images).numpy(),
        )
    from edge_node.accel.cuda import CudaBackend

    model = create_model(spec, device="cuda").eval()
    b = CudaBackend(model, fp16=(backend == "cuda"))
    sync = torch.cuda.synchronize
    return (
        lambda px: (b.encode_pixels(px), sync())[0],
        lambda texts: (b.encode_text(texts), sync())[0],
        b.encode_images,
    )


def _measure(job: dict) -> dict:
    from common.preprocess import PreprocessCfg, to_batch

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    enc_px, enc_txt, enc_img = _load(job["backend"], job["spec"], job["export"], job["threads"])
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    cfg = PreprocessCfg.from_dict(job["preprocess"])
    crops = sample_crops(max(job["batches"]), tuple(cfg.size), seed=1)
    pixels = to_batch(crops, cfg).numpy()
    texts = sample_captions(max(job["batches"]), seed=1)
    result = {"load_s": load_s, "throughput": []}
    for tower, fn, data in (("image", enc_px, pixels), ("text", enc_txt, texts)):
        for batch in job["batches"]:
            chunk = data[:batch]
            fn(chunk)  # warm-up: allocations, ORT/oneDNN kernel selection, CUDA context
            times = []
            for _ in range(job["iters"]):
                t = time.perf_counter()
                fn(chunk)
                times.append(time.perf_counter() - t)
            sec = float(np.median(times))
            result["throughput"].append(
                {"tower": tower, "batch": batch, "ms_per_batch": 1000 * sec, "per_s": batch / sec}
            )
    parity_crops = sample_crops(PARITY_ITEMS, tuple(cfg.size), seed=2)
    result["parity_emb"] = {
        "image": enc_img(parity_crops).tolist(),
        "text": enc_txt(sample_captions(PARITY_ITEMS, seed=2)).tolist(),
    }
    if job.get("rank_data"):
        result["rank"] = _rank(enc_img, enc_txt, job["rank_data"])
    result["rss_mb"] = {
        "before_load": rss0,
        "after_load": rss_loaded,
        "peak": _rss_mb("VmHWM"),
    }
    return result


def _rank(enc_img, enc_txt, data: str) -> dict:
    from common.datasets import load_records
    from common.metrics import retrieval_metrics
    from common.preprocess import load_image

    records = load_records(data, split="test")
    gallery = [load_image(r.image_path) for r in records]
    queries = [(c, r.person_id) for r in records for c in r.captions[:1]]
    img = np.concatenate([enc_img(gallery[i : i + 64]) for i in range(0, len(gallery), 64)])
    txt = enc_txt([q for q, _ in queries])
    m = retrieval_metrics(txt @ img.T, [p for _, p in queries], [r.person_id for r in records])
    return {"R1": m["R1"], "mAP": m["mAP"], "queries": len(queries), "gallery": len(records)}


def _run_child(job: dict) -> dict:
    return run_in_child(_measure, job, f"{job['spec']} / {job['backend']}")


# ---------------------------------------------------------------------- parent
def _make_rank_data(work: Path) -> Path:
    from sims.synth.generate import SynthConfig, generate

    out = work / "rank-data"
    if not (out / "annotations.json").is_file():
        cfg = SynthConfig(
            identities=50, source_identities=0, cameras=2, nodes=1, shift="mild", seed=7
        )
        generate(cfg, out, workers=1)
    return out


def _calibration_crops(rank_data: Path | None, limit: int = 64):
    """Gallery crops from the train split (disjoint from the Rank-1 test gallery)."""
    if rank_data is None:
        return sample_crops(limit, (128, 64), seed=3)
    from common.datasets import load_records
    from common.preprocess import load_image

    records = load_records(rank_data, split="train")
    step = max(1, len(records) // limit)
    return [load_image(r.image_path) for r in records[::step][:limit]]


def _slug(spec: str) -> str:
    """A folder name for a spec that may be a path (a pretrained model directory)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.strip("/"))[-80:]


def export_dir(work: Path, spec: str, precision: str) -> Path:
    return work / _slug(spec) / f"onnx-{precision}"


def _export(spec: str, work: Path, calib) -> tuple[dict, dict, int]:
    import torch

    from common.factory import create_model
    from edge_node.accel.export import export_model

    model = create_model(spec).eval()
    n_params = model.num_parameters()
    seconds = {}
    with torch.no_grad():
        for variant in ("fp32", "int8", "int8-text"):
            t = time.perf_counter()
            export_model(
                model,
                export_dir(work, spec, variant),
                model_spec=spec,
                precision=variant[:4],
                calib_images=calib if variant != "fp32" else None,
                quantize_text=variant == "int8-text",
            )
            seconds[variant] = time.perf_counter() - t
    return seconds, model.preprocess.to_dict(), n_params


def _min_cos(a: list, b: list) -> float:
    a, b = np.asarray(a), np.asarray(b)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def merge_repeats(runs: list[dict]) -> dict:
    """One backend's passes -> the first pass with each cell's median rate (and all rates)."""
    merged = dict(runs[0])
    rows = []
    for i, row in enumerate(runs[0]["throughput"]):
        rates = [run["throughput"][i]["per_s"] for run in runs]
        median = float(np.median(rates))
        rows.append({**row, "per_s": median, "ms_per_batch": 1000 * row["batch"] / median})
        rows[-1]["per_s_passes"] = rates
    merged["throughput"] = rows
    merged["rss_mb"] = {k: max(run["rss_mb"][k] for run in runs) for k in runs[0]["rss_mb"]}
    return merged


def _summarise(runs: dict[str, dict], reference: str = "torch") -> dict:
    ref = runs[reference]
    base = {(r["tower"], r["batch"]): r["per_s"] for r in ref["throughput"]}
    out = {}
    for name, run in runs.items():
        rows = []
        for r in run["throughput"]:
            rows.append({**r, "ratio_vs_torch": r["per_s"] / base[(r["tower"], r["batch"])]})
        entry = {
            "throughput": rows,
            "rss_mb": run["rss_mb"],
            "load_s": run["load_s"],
            "parity_min_cos_vs_torch": {
                t: _min_cos(run["parity_emb"][t], ref["parity_emb"][t]) for t in ("image", "text")
            },
        }
        if "cuda-fp32" in runs and name == "cuda":
            entry["parity_min_cos_vs_cuda_fp32"] = {
                t: _min_cos(run["parity_emb"][t], runs["cuda-fp32"]["parity_emb"][t])
                for t in ("image", "text")
            }
        if "rank" in run:
            entry["rank"] = {**run["rank"], "R1_change": run["rank"]["R1"] - ref["rank"]["R1"]}
        out[name] = entry
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    from common.errors import ConfigError

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    available = CPU_BACKENDS + (GPU_BACKENDS if torch.cuda.is_available() else ())
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] or list(available)
    unknown = sorted(set(backends) - set(available))
    if unknown or "torch" not in backends:
        raise ConfigError(
            f"--backends must include torch and come from {available}; unknown: {unknown}"
        )
    if not batches or min(batches) < 1 or min(args.iters, args.threads, args.repeats) < 1:
        raise ConfigError("--batches, --iters, --threads and --repeats must be positive")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-embed-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if load_before[0] > (os.cpu_count() or 1) * 0.5:
        print(
            f"[bench embed] warning: load average {load_before[0]:.1f} on {os.cpu_count()} cores;"
            " other work competes for the CPU (multi-threaded torch suffers most): figures "
            "will be noisy. --threads 1 is steadier on a shared machine.",
            flush=True,
        )
    rank_data = args.rank_data
    if rank_data is None and args.rank_model in models:
        rank_data = _make_rank_data(work)
    calib = _calibration_crops(rank_data)
    report = {
        "command": "fedretrieve bench embed " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else []),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_before": load_before,
        },
        "versions": _versions(),
        "notes": "images/s from normalised pixels (model only); texts/s include tokenisation; "
        "median of timed batches after one warm-up; each backend in its own process",
        "models": {},
    }
    for spec in models:
        t = time.perf_counter()
        export_s, preprocess, n_params = _export(spec, work, calib)
        iters = args.large_iters if n_params > 50_000_000 else args.iters
        runs: dict[str, list[dict]] = {b: [] for b in backends}
        for repeat in range(args.repeats):  # backends interleaved: a load spike hits one pass
            for backend in backends:
                job = {
                    "spec": spec,
                    "backend": backend,
                    "export": str(export_dir(work, spec, EXPORTS.get(backend, "fp32"))),
                    "threads": args.threads,
                    "batches": batches,
                    "iters": iters,
                    "preprocess": preprocess,
                    "rank_data": str(rank_data)
                    if rank_data and spec == args.rank_model and repeat == 0
                    else None,
                }
                print(f"[bench embed] {spec}: {backend} (pass {repeat + 1}) ...", flush=True)
                runs[backend].append(_run_child(job))
        report["models"][spec] = {
            "parameters": n_params,
            "iters": iters,
            "export_s": export_s,
            "wall_s": time.perf_counter() - t,
            "repeats": args.repeats,
            "backends": _summarise({b: merge_repeats(r) for b, r in runs.items()}),
        }
        _print_model(spec, report["models"][spec])
    report["machine"]["loadavg_after"] = os.getloadavg()
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json_out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _versions() -> dict:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _print_model(spec: str, entry: dict) -> None:
    print(f"\n{spec} ({entry['parameters'] / 1e6:.1f} M parameters, {entry['iters']} iters)")
    print(f"{'backend':18} {'tower':5} {'batch':>5} {'items/s':>9} {'x torch':>8} {'RSS MB':>8}")
    for name, b in entry["backends"].items():
        for r in b["throughput"]:
            print(
                f"{name:18} {r['tower']:5} {r['batch']:5d} {r['per_s']:9.1f} "
                f"{r['ratio_vs_torch']:8.2f} {b['rss_mb']['peak']:8.0f}"
            )
        cos = b["parity_min_cos_vs_torch"]
        line = f"  parity vs torch: image {cos['image']:.5f} text {cos['text']:.5f}"
        if "rank" in b:
            line += f"; Rank-1 {b['rank']['R1']:.1f} (change {b['rank']['R1_change']:+.1f})"
        print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sims.bench.embed")
    register_bench(parser.add_subparsers(dest="bench", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
