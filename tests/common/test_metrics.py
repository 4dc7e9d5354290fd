"""Metrics against hand-computed cases (IRRA's definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import retrieval_metrics


def test_several_positives_hand_computed() -> None:
    # query id 1: ranking ids [2, 1, 1] -> hits at ranks 2 and 3
    # AP = (1/2 + 2/3) / 2 = 0.58333; INP = 2 / 3
    # query id 2: ranking (0.5, 0.3, 0.1) -> ids [1, 1, 2] -> hit at rank 3: AP = INP = 1/3
    sim = np.array([[0.9, 0.8, 0.7], [0.1, 0.5, 0.3]])
    m = retrieval_metrics(sim, [1, 2], [2, 1, 1])
    assert m["R1"] == 0.0 and m["R5"] == 100.0
    assert m["mAP"] == pytest.approx(100 * (7 / 12 + 1 / 3) / 2)
    assert m["mINP"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert (m["queries"], m["gallery"], m["excluded"]) == (2, 3, 0)


def test_ties_keep_gallery_order() -> None:
    sim = np.array([[0.5, 0.5, 0.5]])
    assert retrieval_metrics(sim, [7], [7, 1, 1])["R1"] == 100.0
    assert retrieval_metrics(sim, [7], [1, 7, 1])["R1"] == 0.0
    assert retrieval_metrics(sim, [7], [1, 7, 1])["mAP"] == pytest.approx(50.0)


def test_cmc_is_clamped_and_rank_k_counts_first_hit() -> None:
    sim = np.array([[0.9, 0.8, 0.1, 0.0, -0.1, -0.2]])
    m = retrieval_metrics(sim, [3], [3, 3, 0, 0, 0, 0])
    assert m["R1"] == m["R5"] == m["R10"] == 100.0  # two hits still count once
    assert m["mAP"] == pytest.approx(100.0) and m["mINP"] == pytest.approx(100.0)
    m = retrieval_metrics(sim, [3], [0, 0, 0, 0, 0, 3])
    assert m["R1"] == 0.0 and m["R5"] == 0.0 and m["R10"] == 100.0
    assert m["mAP"] == pytest.approx(100 / 6)


def test_query_without_positive_is_excluded_not_nan() -> None:
    sim = np.array([[0.9, 0.1], [0.2, 0.8]])
    m = retrieval_metrics(sim, [1, 99], [1, 2])
    assert m["queries"] == 1 and m["excluded"] == 1
    assert m["R1"] == 100.0 and not np.isnan(m["mAP"])
    none = retrieval_metrics(sim, [98, 99], [1, 2])
    assert none["queries"] == 0 and none["R1"] == 0.0


def test_chunking_does_not_change_results() -> None:
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(50, 40))
    q, g = rng.integers(0, 8, 50), rng.integers(0, 8, 40)
    a, b = retrieval_metrics(sim, q, g, chunk=7), retrieval_metrics(sim, q, g, chunk=1024)
    assert a == pytest.approx(b, rel=1e-12)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="similarity"):
        retrieval_metrics(np.zeros((2, 3)), [1], [1, 2, 3])
