"""Fewer hits per node when there are many nodes, with a stated chance of an exact merge.

With n nodes and a merged top-k, each node is normally asked for k hits, so the broker
receives n * k hits to keep k. If the global top-k were spread over the nodes at random,
in proportion to their gallery sizes (share p_i), the number of them on node i would be
X_i ~ Binomial(k, p_i), and asking node i for k'_i hits loses nothing unless X_i > k'_i.
By the union bound,

    P(merged top-k != exact top-k) <= sum_i P(X_i > k'_i),

so giving each node the budget (1 - probability) / n and taking the smallest k'_i with
P(X_i > k'_i) <= that budget guarantees the stated probability under the assumption. This is
the idea behind Vespa's `top-k-probability`, derived here with a union bound instead of
an independence approximation: the X_i are multinomial, negatively associated, and for
such variables the product of per-node probabilities over-states the chance that all fit.

The assumption is what makes this a choice, not a default: a text query for one person
often has its true top-k on the one site that saw the person. `fedretrieve bench fleet`
measures how often the merge differs on random vectors (where the assumption holds);
person search at a real site concentrates more, so keep `topk-probability = 0` (off) unless
the fleet is large, the sites are alike, and a rare approximate answer is acceptable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def binomial_tail(k: int, p: float, x: int) -> float:
    """P(Binomial(k, p) > x), summed exactly (k is a page of hits, at most thousands)."""
    if x >= k:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    # sum the lower part in log space for stability, then take the complement
    log_p, log_q = math.log(p), math.log1p(-p)
    lower = 0.0
    for i in range(x + 1):
        log_term = (
            math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1)
            + i * log_p + (k - i) * log_q
        )  # fmt: skip
        lower += math.exp(log_term)
    return max(0.0, 1.0 - lower)


def hits_per_node(k: int, shares: Sequence[float], probability: float) -> list[int]:
    """k'_i for each node, so that the merged top-k is exact with at least `probability`
    when the true top-k is spread over the nodes in proportion to `shares`.

    `probability` 0 (or >= 1) asks every node for k, today's behaviour. Shares need not
    sum to 1 (they are normalised); a node with share 0 still gets one hit, since its
    gallery size may simply be unknown."""
    if not shares:
        return []
    if probability <= 0.0 or probability >= 1.0 or len(shares) == 1:
        return [k] * len(shares)
    total = float(sum(max(s, 0.0) for s in shares))
    budget = (1.0 - probability) / len(shares)
    out = []
    for share in shares:
        p = max(share, 0.0) / total if total > 0 else 1.0 / len(shares)
        x = max(1, math.ceil(k * p))  # never below the expected count
        while x < k and binomial_tail(k, p, x) > budget:
            x += 1
        out.append(min(x, k))
    return out
