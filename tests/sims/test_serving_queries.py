"""Which test captions the simulation's serving stage sends through the broker."""

from __future__ import annotations

from itertools import pairwise

from sims.simulation.serving import spread_queries


def test_a_query_limit_spreads_over_the_whole_split():
    picked = spread_queries(2304, 384)
    assert len(picked) == len(set(picked)) == 384
    assert picked[0] == 0 and picked[-1] >= 2304 - 2304 // 384  # reaches the last cameras
    gaps = {b - a for a, b in pairwise(picked)}
    assert gaps == {6}


def test_no_limit_or_a_large_one_sends_every_caption():
    assert spread_queries(10, 0) == list(range(10))
    assert spread_queries(10, 10) == list(range(10))
    assert spread_queries(10, 50) == list(range(10))
    assert spread_queries(7, 3) == [0, 2, 4]
