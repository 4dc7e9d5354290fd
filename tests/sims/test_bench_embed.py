"""bench embed: ratios against torch, parity and Rank-1 change are computed per backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from sims.bench.embed import _slug, _summarise, export_dir, merge_repeats, sample_captions


def _run(per_s: float, emb: list, r1: float) -> dict:
    return {
        "throughput": [{"tower": "image", "batch": 32, "per_s": per_s, "ms_per_batch": 1.0}],
        "rss_mb": {"peak": 100.0},
        "load_s": 0.1,
        "parity_emb": {"image": emb, "text": emb},
        "rank": {"R1": r1, "mAP": 0.0, "queries": 4, "gallery": 8},
    }


def test_ratios_parity_and_rank_change_against_torch():
    runs = {
        "torch": _run(10.0, [[1.0, 0.0], [0.0, 1.0]], 50.0),
        "onnxruntime-int8": _run(25.0, [[1.0, 0.0], [0.6, 0.8]], 47.5),
    }
    out = _summarise(runs)
    assert out["torch"]["throughput"][0]["ratio_vs_torch"] == 1.0
    assert out["onnxruntime-int8"]["throughput"][0]["ratio_vs_torch"] == 2.5
    assert out["onnxruntime-int8"]["parity_min_cos_vs_torch"]["image"] == pytest.approx(0.8)
    assert out["onnxruntime-int8"]["rank"]["R1_change"] == pytest.approx(-2.5)


def test_inputs_are_deterministic_and_paths_become_folder_names():
    assert sample_captions(5, seed=3) == sample_captions(5, seed=3)
    assert "/" not in _slug("/tmp/models/default-base")
    work = Path("/w")
    assert export_dir(work, "/tmp/models/base", "int8").parent.parent == work


def test_repeats_take_the_median_rate_per_cell():
    passes = [_run(r, [[1.0, 0.0]], 10.0) for r in (30.0, 10.0, 20.0)]
    passes[1]["rss_mb"] = {"peak": 150.0}
    merged = merge_repeats(passes)
    assert merged["throughput"][0]["per_s"] == 20.0
    assert merged["throughput"][0]["per_s_passes"] == [30.0, 10.0, 20.0]
    assert merged["rss_mb"]["peak"] == 150.0
