"""k' per node: the union bound it promises holds, exactly and in a seeded simulation."""

from __future__ import annotations

import numpy as np
import pytest

from server.broker.topk import binomial_tail, hits_per_node


def test_binomial_tail_matches_hand_computed_values():
    assert binomial_tail(2, 0.5, 0) == pytest.approx(0.75)
    assert binomial_tail(2, 0.5, 1) == pytest.approx(0.25)
    assert binomial_tail(3, 0.1, 0) == pytest.approx(1 - 0.9**3)
    assert binomial_tail(10, 0.3, 10) == 0.0
    assert binomial_tail(5, 0.0, 0) == 0.0 and binomial_tail(5, 1.0, 4) == 1.0


def test_off_and_single_node_ask_for_k():
    assert hits_per_node(20, [1.0] * 5, 0.0) == [20] * 5
    assert hits_per_node(20, [1.0], 0.999) == [20]
    assert hits_per_node(20, [], 0.99) == []


@pytest.mark.parametrize(("n", "k", "prob"), [(10, 10, 0.99), (100, 20, 0.999), (1000, 10, 0.99)])
def test_the_union_bound_holds_for_the_chosen_k(n, k, prob):
    shares = [1.0] * n
    per_node = hits_per_node(k, shares, prob)
    assert all(1 <= x <= k for x in per_node)
    assert sum(binomial_tail(k, 1.0 / n, x) for x in per_node) <= (1 - prob) + 1e-12
    if n >= 100:
        assert max(per_node) < k  # at scale it really asks for fewer hits


def test_unequal_galleries_get_budgets_in_proportion():
    per_node = hits_per_node(50, [0.7, 0.1, 0.1, 0.1], 0.99)
    assert per_node[0] > per_node[1] == per_node[2] == per_node[3]


def test_simulated_placements_rarely_exceed_the_budget():
    """Place the true top-k on nodes at random (multinomial, seeded): the share of
    queries whose merge would differ stays under 1 - probability."""
    n, k, prob = 200, 20, 0.99
    per_node = np.array(hits_per_node(k, [1.0] * n, prob))
    rng = np.random.default_rng(0)
    counts = rng.multinomial(k, [1.0 / n] * n, size=20_000)
    differs = (counts > per_node).any(axis=1).mean()
    assert differs <= 1 - prob
