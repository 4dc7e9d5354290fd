"""What the benchmarks share: the operator-style query captions, latency percentiles, and
measuring in a child process of its own.

One caption generator for every benchmark, so their text-encoding figures are measured on
the same kind of query and can be compared.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable

import numpy as np

QUERY_PARTS = (
    ("a man", "a woman", "a young person", "an older man", "a girl"),
    ("in a red jacket", "wearing a blue shirt", "in a white t-shirt", "in black"),
    ("and dark trousers", "with jeans", "and a grey skirt", "with shorts"),
    ("carrying a backpack", "holding a phone", "with a yellow bag", "wearing a cap", ""),
)


def sample_captions(n: int, seed: int = 0) -> list[str]:
    """`n` queries like "a woman in a red jacket with jeans carrying a backpack", seeded."""
    rng = np.random.default_rng(seed)
    return [" ".join(p[int(rng.integers(len(p)))] for p in QUERY_PARTS).strip() for _ in range(n)]


def percentiles(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "mean_ms": round(float(arr.mean()), 2),
        "n": len(ms),
    }


def _child(measure: Callable[[dict], dict], job: dict, queue) -> None:
    try:
        queue.put(measure(job))
    except BaseException as err:  # reported by the parent, which fails the run
        queue.put({"error": f"{type(err).__name__}: {err}"})


def run_in_child(measure: Callable[[dict], dict], job: dict, what: str) -> dict:
    """`measure(job)` in a fresh spawned process, so its memory and caches are its own;
    an exception there fails the run here, naming `what` was measured."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(measure, job, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"{what}: {out['error']}")
    return out
