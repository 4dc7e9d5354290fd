"""Annotator-style captions written from an identity's attributes.

Real captions (CUHK-PEDES, ICFG-PEDES) vary in template, word order and vocabulary
(red/crimson, trousers/pants), often skip part of the outfit, and usually go top to bottom.
The writer below does the same, and only ever names attributes the identity has: every
colour word sits right before the noun it describes ("a crimson hoodie", "white sneakers"),
so tests can check that mechanically. What the camera cannot see is mentioned less often
(a backpack's straps from the front), as annotators do.
"""

from __future__ import annotations

import numpy as np

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
)

PLURAL_NOUNS = {"trousers", "pants", "slacks", "jeans", "denim pants", "shorts", "shoes",
                "sneakers", "footwear"}  # fmt: skip
GARMENT_SLOTS = ("headwear", "upper", "lower", "shoes")


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _colour_word(name: str, rng: np.random.Generator) -> str:
    return _choice(rng, COLOURS[name][1])


def _np(noun: str, adjectives: str, rng: np.random.Generator, article: bool = True) -> str:
    """Noun phrase with an article where English wants one ("a red cap", "blue jeans")."""
    phrase = f"{adjectives} {noun}".strip()
    if not article or noun in PLURAL_NOUNS:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _slot_phrase(ident: Identity, slot: str, rng: np.random.Generator) -> str:
    """One mention of one attribute, e.g. 'a navy blue t-shirt with white stripes'."""
    drop_colour = slot in ("lower", "shoes", "headwear") and rng.random() < 0.1
    if slot == "hair":
        colour = _choice(rng, HAIR_COLOURS[ident.hair_colour][1])
        form = int(rng.integers(3))
        words = [ident.hair_length] if form != 1 else []
        if form != 0 or ident.hair_length == "short":
            words.append(colour)
        return " ".join([*words, "hair"])
    if slot == "headwear":
        colour = "" if drop_colour else _colour_word(ident.headwear_colour, rng)
        return _np(_choice(rng, HEADWEAR[ident.headwear]), colour, rng)
    if slot == "upper":
        noun = _choice(rng, UPPER[ident.upper])
        colour = _colour_word(ident.upper_colour, rng)
        if not ident.stripe_colour:
            return _np(noun, colour, rng)
        stripe = _colour_word(ident.stripe_colour, rng)
        if rng.random() < 0.5:
            return _np(noun, colour, rng) + f" with {stripe} stripes"
        return _np(noun, f"{colour} and {stripe} striped", rng)
    if slot == "lower":
        colour = "" if drop_colour else _colour_word(ident.lower_colour, rng)
        return _np(_choice(rng, LOWER[ident.lower]), colour, rng)
    if slot == "shoes":
        colour = "" if drop_colour else _colour_word(ident.shoes_colour, rng)
        return _np(_choice(rng, SHOES), colour, rng)
    if slot == "bag":
        return _np(_choice(rng, BAGS[ident.bag]), _colour_word(ident.bag_colour, rng), rng)
    raise ValueError(f"unknown slot {slot!r}")


def _join(items: list[str], rng: np.random.Generator) -> str:
    if len(items) <= 1:
        return "".join(items)
    last = _choice(rng, (" and ", ", and ", " and ")) if len(items) > 2 else " and "
    return ", ".join(items[:-1]) + last + items[-1]


def _bag_clause(ident: Identity, phrase: str, pron: str, rng: np.random.Generator) -> str:
    his = "her" if ident.gender == "female" else "his"
    options = [f"{pron} is carrying {phrase}", f"{pron} carries {phrase}"]
    if ident.bag == "backpack":
        options.append(f"{pron} has {phrase} on {his} back")
    elif ident.bag == "shoulder bag":
        options.append(f"{pron} has {phrase} over {his} shoulder")
    else:
        options.append(f"{pron} is holding {phrase}")
    return _choice(rng, options)


def _visible_slots(ident: Identity, view: str, rng: np.random.Generator) -> list[str]:
    slots = ["hair", "upper", "shoes"]
    if ident.headwear != "none":
        slots.append("headwear")
    if ident.lower != "none":
        slots.append("lower")
    if ident.bag != "none" and not (
        ident.bag == "backpack" and view == "front" and rng.random() < 0.4
    ):
        slots.append("bag")
    return slots


def write_caption(
    ident: Identity, view: str, rng: np.random.Generator, partial_prob: float = 0.35
) -> str:
    """One caption; with probability `partial_prob` it covers only 1-3 attributes."""
    slots = _visible_slots(ident, view, rng)
    if rng.random() < partial_prob:  # 2-3 attributes, at least one of them a garment
        k = int(rng.integers(2, min(3, len(slots)) + 1))
        keep = {slots[i] for i in rng.choice(len(slots), size=k, replace=False)}
        if not keep & {"upper", "lower"}:
            keep.add("upper")
        slots = [s for s in slots if s in keep]
    elif rng.random() < 0.3:  # full captions also skip the odd item
        drop = _choice(rng, slots)
        slots = [s for s in slots if s != drop] or slots
    phrases = {s: _slot_phrase(ident, s, rng) for s in slots}
    pron = "she" if ident.gender == "female" else "he"
    person = _choice(rng, GENDER_WORDS[ident.gender])
    garments = [phrases[s] for s in ("headwear", "upper", "lower", "shoes") if s in phrases]
    if rng.random() < 0.3:
        garments = [garments[i] for i in rng.permutation(len(garments))]
    view_phrase = {
        "back": _choice(rng, ("", " seen from behind", " walking away from the camera")),
        "side": _choice(rng, ("", " seen from the side", " walking past")),
        "front": _choice(rng, ("", "", " walking towards the camera")),
    }[view]
    hair = phrases.get("hair")
    bag = phrases.get("bag")
    template = int(rng.integers(5))
    det = _choice(rng, ("A", "The", "This"))
    wear = _choice(rng, ("is wearing", "wears", "is dressed in", "has on"))
    sentences: list[str] = []
    if template == 0:  # A woman with long hair is wearing X, Y and Z. She is carrying B.
        subj = f"{det} {person}{view_phrase}" + (f" with {hair}" if hair else "")
        sentences.append(f"{subj} {wear} {_join(garments, rng)}" if garments else subj)
        if bag:
            sentences.append(_bag_clause(ident, bag, pron, rng))
    elif template == 1:  # The man wears X and Y, and has short hair and B.
        extras = [p for p in (hair, bag) if p]
        first = f"{det} {person}{view_phrase} {wear} {_join(garments, rng)}" if garments else ""
        if first:
            sentences.append(first + (f", and has {_join(extras, rng)}" if extras else ""))
        else:
            sentences.append(f"{det} {person}{view_phrase} has {_join(extras, rng)}")
    elif template == 2:  # Woman in X and Y, with B.
        tail = [f"with {bag}"] if bag else []
        head = f"{person.capitalize()}{view_phrase}"
        if hair:
            head += f" with {hair}"
        body = f" in {_join(garments, rng)}" if garments else ""
        sentences.append(head + body + (", " + tail[0] if tail else ""))
    elif template == 3:  # The man has short black hair. He is dressed in X. He carries B.
        sentences.append(
            f"{det} {person}{view_phrase}" + (f" has {hair}" if hair else " is walking")
        )
        if garments:
            sentences.append(f"{pron} {wear} {_join(garments, rng)}")
        if bag:
            sentences.append(_bag_clause(ident, bag, pron, rng))
    else:  # list style: X, Y and Z; a man with short hair
        items = garments + ([bag] if bag else [])
        who = _np(person, "", rng) + (f" with {hair}" if hair else "")
        sentences.append(f"{_join(items, rng)}; {who}" if items else who)
    text = ". ".join(s[0].upper() + s[1:] for s in sentences)
    if rng.random() < 0.85:
        text += "."
    if rng.random() < 0.1:
        text = text.lower()
    return text


def write_captions(
    ident: Identity, view: str, rng: np.random.Generator, n: int = 2, partial_prob: float = 0.35
) -> list[str]:
    """`n` captions by `n` 'annotators'; retries once to avoid two identical strings."""
    out: list[str] = []
    for _ in range(n):
        cap = write_caption(ident, view, rng, partial_prob)
        if cap in out:
            cap = write_caption(ident, view, rng, partial_prob)
        out.append(cap)
    return out
