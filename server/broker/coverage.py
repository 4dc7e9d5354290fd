"""Coverage: which of the selected nodes a query's answer speaks for (DESIGN.md §7).

The block is Elasticsearch's `_shards` plus Vespa's `coverage`: counts per outcome, the
vectors searched out of those known to exist, a `full` flag and degraded reasons. No node
is ever dropped silently: each selected node has one `NodeOutcome` (a regional broker's
answer stands for the sites under it, one `region/site` outcome each: server/broker/tier.py),
and the two ways a
query fails for want of coverage (no node answered; `require_full_coverage` not met) say
which node did what.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import Unavailable
from protos import broker_pb2, node_pb2
from server.broker.registry import NodeState


def skipped_outcome(node_id: str, known: NodeState) -> broker_pb2.NodeOutcome:
    """The outcome of a node camera routing did not ask (it holds none of the cameras)."""
    return broker_pb2.NodeOutcome(
        node_id=node_id,
        state="skipped",
        message="holds none of the requested cameras",
        gallery_size=known.gallery_size,
        model_version=known.model_version,
    )


def note_no_query_vector(outcome: broker_pb2.NodeOutcome, known: NodeState) -> None:
    """Add the broker's half of a vector-only node's refusal (FAILED_PRECONDITION, the
    node's message naming its mode) when the broker had no vector to send: it embeds no
    queries, so every text query reaches such a node as text it cannot encode."""
    if outcome.grpc_status == "FAILED_PRECONDITION" and known.vector_only:
        outcome.message += (
            "; this broker embeds no queries (no `model` in its config), so the node got text only"
        )


def coverage_of(
    outcomes: list[broker_pb2.NodeOutcome], answers: dict[str, node_pb2.SearchResponse]
) -> broker_pb2.Coverage:
    """The coverage block (Elasticsearch `_shards` + Vespa `coverage`)."""
    cov = broker_pb2.Coverage()
    for o in outcomes:
        answer = answers.get(o.node_id) if o.state == "ok" else None
        if answer is not None:
            cov.vectors_searched += answer.vectors_searched
        cov.vectors_total += o.gallery_size
        if answer is not None and answer.lower_tier:  # a region: count the sites under it
            for site in answer.lower_tier:
                rolled = cov.nodes.add()
                rolled.CopyFrom(site)
                rolled.node_id = f"{o.node_id}/{site.node_id}"
                _count(cov, rolled.state)
            continue
        cov.nodes.add().CopyFrom(o)
        _count(cov, o.state)
    cov.nodes_total = len(cov.nodes)
    cov.full = cov.nodes_answered + cov.nodes_skipped == cov.nodes_total
    if cov.nodes_timed_out:
        cov.degraded.append("timeout")
    if cov.nodes_failed:
        cov.degraded.append("node_failure")
    return cov


def _count(cov: broker_pb2.Coverage, state: str) -> None:
    if state == "ok":
        cov.nodes_answered += 1
    elif state == "skipped":
        cov.nodes_skipped += 1
    elif state == "timed_out":
        cov.nodes_timed_out += 1
    else:
        cov.nodes_failed += 1


def require_an_answer(
    cov: broker_pb2.Coverage, outcomes: Sequence[broker_pb2.NodeOutcome], query_id: str
) -> None:
    """Raise Unavailable when no node answered (a query every node skipped is answered)."""
    if not cov.nodes_answered and not cov.nodes_skipped:
        raise Unavailable(f"no node answered query {query_id}: {describe_outcomes(outcomes)}")


def require_full(
    cov: broker_pb2.Coverage, outcomes: Sequence[broker_pb2.NodeOutcome], query_id: str
) -> None:
    """Raise Unavailable when some selected node neither answered nor was skipped."""
    if not cov.full:
        raise Unavailable(
            f"incomplete coverage and require_full_coverage is set "
            f"(query {query_id}): {cov.nodes_answered}/{cov.nodes_total} "
            f"nodes answered; {describe_outcomes(outcomes)}"
        )


def describe_outcomes(outcomes: Sequence[broker_pb2.NodeOutcome]) -> str:
    """`node-a ok; node-b failed UNAVAILABLE (connection refused); ...` for error messages."""
    parts = []
    for o in outcomes:
        if o.state in ("ok", "skipped"):
            parts.append(f"{o.node_id} {o.state}")
        else:
            detail = f" ({o.message})" if o.message else ""
            parts.append(f"{o.node_id} {o.state} {o.grpc_status}{detail}")
    return "; ".join(parts)
