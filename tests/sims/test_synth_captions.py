"""Captions mention only attributes the identity has, in varied annotator-style wording."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sims.synth.attributes import (
    BAGS,
    COLOURS,
    GENDER_WORDS,
    HAIR_COLOURS,
    HEADWEAR,
    LOWER,
    SHOES,
    UPPER,
    Identity,
    node_weights,
    sample_identity,
)
from sims.synth.captions import write_captions

# phrase -> (kind, canonical): every word an annotator may use, matched longest first.
VOCAB: dict[str, tuple[str, str]] = {}
for name, (_, words) in COLOURS.items():
    VOCAB.update({w: ("colour", name) for w in words})
for slot, table in (("headwear", HEADWEAR), ("upper", UPPER), ("lower", LOWER), ("bag", BAGS)):
    for kind, words in table.items():
        VOCAB.update({w: (slot, kind) for w in words})
VOCAB.update({w: ("shoes", "shoes") for w in SHOES})
for gender, words in GENDER_WORDS.items():
    VOCAB.update({w: ("gender", gender) for w in words})
TOKEN = re.compile(r"\b(" + "|".join(map(re.escape, sorted(VOCAB, key=len, reverse=True))) + r")\b")
HAIR_WORDS = {w: name for name, (_, words) in HAIR_COLOURS.items() for w in words}
HAIR = re.compile(r"\b(?:(short|long) )?(?:(" + "|".join(HAIR_WORDS) + r") )?hair\b")


def check_caption(caption: str, ident: Identity) -> None:
    """Fail unless every attribute word in `caption` is true of `ident`."""
    text = caption.lower()
    for m in HAIR.finditer(text):
        if m.group(1):
            assert m.group(1) == ident.hair_length, caption
        if m.group(2):
            assert HAIR_WORDS[m.group(2)] == ident.hair_colour, caption
    text = HAIR.sub(" hair ", text)
    worn = {
        "headwear": (ident.headwear, ident.headwear_colour),
        "upper": (ident.upper, ident.upper_colour),
        "lower": (ident.lower, ident.lower_colour),
        "shoes": ("shoes", ident.shoes_colour),
        "bag": (ident.bag, ident.bag_colour),
    }
    tokens = list(TOKEN.finditer(text))
    assert tokens, caption
    for i, m in enumerate(tokens):
        kind, value = VOCAB[m.group(1)]
        if kind == "gender":
            assert value == ident.gender, caption
        elif kind == "colour":
            assert value in ident.colours(), (caption, value)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            between = text[m.end() : nxt.start()] if nxt else text[m.end() :]
            if between.startswith(" stripes"):
                assert value == ident.stripe_colour, caption
            elif nxt is not None and between == " " and VOCAB[nxt.group(1)][0] in worn:
                slot = VOCAB[nxt.group(1)][0]
                assert value == worn[slot][1], (caption, value, slot)
            elif nxt is not None and between == " striped ":
                assert value in (ident.upper_colour, ident.stripe_colour), caption
        else:
            assert worn[kind][0] == value, (caption, kind, value)


def test_checker_catches_a_wrong_attribute():
    ident = sample_identity(0, np.random.default_rng(5), node_weights(0))
    wrong_colour = next(c for c in COLOURS if c not in ident.colours())
    with pytest.raises(AssertionError):
        check_caption(f"A person in a {wrong_colour} {UPPER[ident.upper][0]}.", ident)
    other_upper = next(u for u in UPPER if u != ident.upper and u != "dress")
    with pytest.raises(AssertionError):
        check_caption(f"A person in a {other_upper}.", ident)


@pytest.mark.parametrize("node", [None, 0, 1, 2, 3])
def test_captions_mention_only_attributes_the_identity_has(node):
    captions = []
    for pid in range(150):
        rng = np.random.default_rng([node if node is not None else 9, pid])
        ident = sample_identity(pid, rng, node_weights(node))
        for view in ("front", "back", "side"):
            for cap in write_captions(ident, view, rng):
                check_caption(cap, ident)
                captions.append(cap)
    assert len(set(captions)) > 0.95 * len(captions)  # varied, not one template


def test_captions_vary_in_vocabulary_and_length():
    rng = np.random.default_rng(0)
    ident = sample_identity(0, rng, node_weights(None))
    caps = [c for _ in range(200) for c in write_captions(ident, "front", rng)]
    upper_words = {w for w in UPPER[ident.upper] if any(w in c.lower() for c in caps)}
    assert len(upper_words) >= min(2, len(UPPER[ident.upper]))
    lengths = [len(c.split()) for c in caps]
    assert min(lengths) <= 8 < 16 <= max(lengths)  # some partial, some full descriptions
    assert sum(c[0].islower() for c in caps) > 0  # the odd lower-case annotator


def test_dataset_captions_match_identities(tmp_path):
    from sims.synth import SynthConfig, generate

    out = tmp_path / "d"
    generate(
        SynthConfig(identities=8, source_identities=2, cameras=2, nodes=1, size=(64, 32)),
        out,
        workers=1,
    )
    import json

    idents = {
        i["id"]: Identity(
            **{k: v for k, v in i.items() if k in Identity.__dataclass_fields__}
            | {"person_id": i["id"]}
        )
        for i in json.loads((out / "identities.json").read_text())
    }
    records = json.loads((out / "annotations.json").read_text())
    assert records, "the generator wrote no annotations: nothing would be checked"
    # every identity of the benchmark (8 target + 2 source) is pictured, and only those
    assert len(idents) == 10 and {rec["id"] for rec in records} == set(idents)
    for rec in records:
        assert len(rec["captions"]) == 2, rec  # the generator writes two per image
        for cap in rec["captions"]:
            check_caption(cap, idents[rec["id"]])
