"""Label-free mining stages (issue 14): tracklets, mutual top-1 pseudo-identities, quality."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.fl.mining import (
    MiningSettings,
    label_quality,
    link_tracklets,
    memories,
    pseudo_identities,
)


def _scene(seed: int = 0):
    """3 people, each visiting cameras A and B once (2 crops a visit, 0.5 s apart); visits
    of different people overlap in time on a camera, so time alone cannot separate them."""
    rng = np.random.default_rng(seed)
    people = rng.normal(size=(3, 16))
    cams, stamps, emb, person, visit = [], [], [], [], []
    for p in range(3):
        for c, cam in enumerate("AB"):
            start = 10_000 * c + 300 * p  # the three visits to a camera overlap
            for k in range(2):
                cams.append(cam)
                stamps.append(start + 500 * k)
                emb.append(people[p] + 0.2 * rng.normal(size=16))
                person.append(p)
                visit.append(2 * p + c)
    return cams, stamps, np.array(emb), np.array(person), np.array(visit)


def test_tracklets_follow_appearance_where_time_alone_would_merge_visits():
    cams, stamps, emb, _, visit = _scene()
    labels = link_tracklets(cams, stamps, emb, MiningSettings(min_cos=0.6))
    assert label_quality(labels, visit) == {
        "precision": 1.0, "recall": 1.0, "labels": 6, "true_labels": 6, "purity": 1.0,
    }  # fmt: skip
    time_only = link_tracklets(cams, stamps, emb, MiningSettings(min_cos=-1.0))
    assert label_quality(time_only, visit)["precision"] < 1.0


def test_a_gap_longer_than_a_track_starts_a_new_tracklet():
    emb = np.ones((2, 4))
    labels = link_tracklets(["A", "A"], [0, 5_000], emb, MiningSettings(max_gap_ms=2_000))
    assert labels.tolist() == [0, 1]


def test_mutual_top1_joins_each_persons_visits_across_cameras():
    cams, stamps, emb, person, _ = _scene(1)
    labels = link_tracklets(cams, stamps, emb, MiningSettings(min_cos=0.6))
    ids = pseudo_identities(labels, cams, emb, MiningSettings(link_cos=0.5))
    assert label_quality(ids, person)["precision"] == 1.0
    assert label_quality(ids, person)["recall"] == 1.0
    # above any similarity: nothing joins, each visit stays its own identity
    alone = pseudo_identities(labels, cams, emb, MiningSettings(link_cos=1.01))
    assert label_quality(alone, person)["labels"] == 6


def test_the_triangle_relation_drops_a_link_no_third_camera_confirms():
    """People 0 and 1 pass cameras A, B and C; two look-alike strangers are seen once each,
    one on A and one on B, and are each other's mutual top-1 there. No memory on C closes
    a triangle over that link, so 004's triangle relation keeps them apart."""
    rng = np.random.default_rng(2)
    people, stranger = rng.normal(size=(2, 16)), rng.normal(size=16)
    cams, emb, person = [], [], []
    for cam in "ABC":
        for p in range(2):
            cams.append(cam)
            emb.append(people[p] + 0.1 * rng.normal(size=16))
            person.append(p)
    for cam, who in (("A", 2), ("B", 3)):
        cams.append(cam)
        emb.append(stranger + 0.3 * rng.normal(size=16))
        person.append(who)
    tracklets = np.arange(len(cams))  # one crop per visit
    emb = np.array(emb)
    plain = pseudo_identities(tracklets, cams, emb, MiningSettings(link_cos=0.5))
    assert plain[-1] == plain[-2]  # the strangers were joined
    assert label_quality(plain, person)["precision"] < 1.0
    triangle = pseudo_identities(tracklets, cams, emb, MiningSettings(link_cos=0.5, triangles=1))
    assert label_quality(triangle, person) == {
        "precision": 1.0, "recall": 1.0, "labels": 4, "true_labels": 4, "purity": 1.0,
    }  # fmt: skip


def test_the_space_time_window_keeps_links_to_visits_a_walk_apart():
    """Each of two people passes A and then B a minute later; the two pass 1,000 s apart.
    B's light makes each look like the other did on A, so appearance alone links the wrong
    visits. With a 120 s window each A visit has one candidate on B: the right one."""
    e1, e2 = np.eye(2)
    cams = ["A", "B", "A", "B"]
    stamps = [0, 60_000, 1_000_000, 1_060_000]
    emb = np.array([e1, 0.9 * e2 + 0.1 * e1, e2, 0.9 * e1 + 0.1 * e2])
    person = [0, 0, 1, 1]
    tracklets = np.arange(4)
    plain = pseudo_identities(tracklets, cams, emb, MiningSettings(link_cos=-1.0))
    assert label_quality(plain, person)["precision"] == 0.0
    window = MiningSettings(link_cos=-1.0, link_window_ms=120_000)
    ids = pseudo_identities(tracklets, cams, emb, window, stamps)
    assert label_quality(ids, person)["precision"] == 1.0
    assert label_quality(ids, person)["recall"] == 1.0
    # a window shorter than the walk links nothing
    short = MiningSettings(link_cos=-1.0, link_window_ms=10_000)
    assert len(set(pseudo_identities(tracklets, cams, emb, short, stamps))) == 4
    with pytest.raises(ValueError, match="timestamps"):  # never silently windowless
        pseudo_identities(tracklets, cams, emb, window)


def test_memories_are_unit_means():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    mem = memories(np.array([0, 0, 1]), emb)
    assert np.allclose(mem, [[2**-0.5, 2**-0.5], [1.0, 0.0]])


@pytest.mark.parametrize(
    ("pred", "truth", "precision", "recall"),
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0),
        ([0, 1, 2, 3], [0, 0, 1, 1], 1.0, 0.0),  # every crop alone
        ([0, 0, 0, 0], [0, 0, 1, 1], 1 / 3, 1.0),  # one cluster: 2 of 6 pairs right
    ],
)
def test_pairwise_quality_by_hand(pred, truth, precision, recall):
    q = label_quality(pred, truth)
    assert q["precision"] == pytest.approx(precision, abs=1e-4)
    assert q["recall"] == pytest.approx(recall, abs=1e-4)
