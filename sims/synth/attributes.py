"""Identity attributes: the vocabulary, the per-node priors and the sampler.

An identity is what a caption can describe (gender, hair, headwear, upper and lower
garment, shoes, bag, each with a colour) plus what it cannot (skin tone, build). Both the
renderer and the caption writer read the same `Identity`, so a caption can only mention
what the person actually wears. Nodes draw identities from different priors (one site sees
more coats, another more shorts) to make the federated data non-IID in content, not only in
camera appearance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# name -> (RGB, words an annotator may use for it). Every word belongs to one colour only.
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((28, 28, 32), ("black",)),
    "white": ((236, 236, 232), ("white",)),
    "grey": ((128, 128, 128), ("grey", "gray")),
    "red": ((196, 30, 36), ("red", "crimson")),
    "blue": ((40, 92, 200), ("blue",)),
    "navy": ((28, 38, 84), ("navy", "dark blue", "navy blue")),
    "green": ((40, 140, 60), ("green",)),
    "yellow": ((236, 206, 40), ("yellow",)),
    "brown": ((110, 70, 38), ("brown",)),
    "pink": ((236, 130, 170), ("pink",)),
    "purple": ((116, 50, 150), ("purple", "violet")),
    "orange": ((240, 126, 30), ("orange",)),
    "beige": ((206, 186, 148), ("beige", "khaki")),
}

HAIR_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((24, 20, 18), ("black", "dark")),
    "brown": ((92, 58, 30), ("brown",)),
    "blonde": ((214, 180, 104), ("blonde", "blond", "fair")),
    "grey": ((160, 160, 156), ("grey", "gray", "silver")),
}

# Garment type -> words an annotator may use. Every word names one type only.
HEADWEAR = {
    "cap": ("cap", "baseball cap", "baseball hat"),
    "beanie": ("beanie", "knit hat", "woolly hat"),
    "hat": ("hat", "brimmed hat", "sun hat"),
}
UPPER = {
    "t-shirt": ("t-shirt", "tee", "short-sleeved top"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt"),
    "jacket": ("jacket", "zip-up jacket", "windbreaker"),
    "coat": ("coat", "long coat", "overcoat"),
    "hoodie": ("hoodie", "hooded sweatshirt", "hooded top"),
    "dress": ("dress",),
}
LOWER = {
    "trousers": ("trousers", "pants", "slacks"),
    "jeans": ("jeans", "denim pants"),
    "shorts": ("shorts",),
    "skirt": ("skirt",),
}
SHOES = ("shoes", "sneakers", "footwear")
BAGS = {
    "backpack": ("backpack", "rucksack"),
    "handbag": ("handbag", "purse"),
    "shoulder bag": ("shoulder bag", "messenger bag", "crossbody bag"),
}
GENDER_WORDS = {
    "male": ("man", "male", "guy", "gentleman", "young man"),
    "female": ("woman", "female", "lady", "young woman"),
}
SKIN_TONES = ((241, 204, 176), (224, 172, 130), (190, 134, 92), (141, 92, 60), (96, 62, 40))

# Base weights of each choice (before node priors). "none" means not worn.
BASE_WEIGHTS: dict[str, dict[str, float]] = {
    "headwear": {"none": 6.0, "cap": 1.5, "beanie": 1.0, "hat": 0.8},
    "upper": {"t-shirt": 3, "shirt": 2, "jacket": 2, "coat": 1.5, "hoodie": 1.5, "dress": 1},
    "lower": {"trousers": 3, "jeans": 3, "shorts": 1.5, "skirt": 1},
    "bag": {"none": 3.0, "backpack": 2.0, "handbag": 1.0, "shoulder bag": 1.2},
    "hair_length": {"short": 1.0, "long": 1.0},
    "hair_colour": {"black": 4, "brown": 3, "blonde": 1.5, "grey": 0.8},
    "colour": {c: 1.0 for c in COLOURS},
    "jeans_colour": {"blue": 5, "navy": 3, "black": 2, "grey": 1},
    "striped": {"no": 4.0, "yes": 1.0},
}

# Multipliers a node applies on top of BASE_WEIGHTS: four site profiles, cycled over nodes.
DARK = ("black", "grey", "navy", "brown")
BRIGHT = ("yellow", "orange", "pink", "red", "white", "green")
NODE_PROFILES: tuple[dict[str, dict[str, float]], ...] = (
    {  # cold street: coats, beanies, dark colours
        "upper": {"coat": 4, "jacket": 2, "t-shirt": 0.3, "dress": 0.4},
        "lower": {"trousers": 2, "shorts": 0.2},
        "headwear": {"beanie": 4, "none": 0.7},
        "colour": {c: 2.5 for c in DARK},
    },
    {  # summer park: t-shirts, shorts, caps, bright colours
        "upper": {"t-shirt": 3, "dress": 2, "coat": 0.2, "jacket": 0.4},
        "lower": {"shorts": 4, "skirt": 1.5, "trousers": 0.5},
        "headwear": {"cap": 4, "hat": 2},
        "colour": {c: 2.5 for c in BRIGHT},
    },
    {  # office district: shirts, trousers, handbags, muted colours
        "upper": {"shirt": 4, "coat": 1.5, "hoodie": 0.3},
        "lower": {"trousers": 3, "jeans": 0.5, "shorts": 0.3},
        "bag": {"handbag": 2.5, "shoulder bag": 2.5, "backpack": 0.5},
        "colour": {c: 2.0 for c in ("white", "navy", "grey", "beige", "blue")},
        "striped": {"yes": 2.0},
    },
    {  # campus: hoodies, jeans, backpacks
        "upper": {"hoodie": 4, "t-shirt": 1.5, "coat": 0.5},
        "lower": {"jeans": 3},
        "bag": {"backpack": 4, "none": 0.5},
        "colour": {c: 2.0 for c in ("green", "purple", "blue", "red", "grey")},
    },
)


@dataclass(frozen=True)
class Identity:
    """One person: everything the renderer draws and the captions may mention."""

    person_id: int
    gender: str  # "male" | "female"
    hair_length: str  # "short" | "long"
    hair_colour: str  # key of HAIR_COLOURS
    headwear: str  # "none" or key of HEADWEAR
    headwear_colour: str
    upper: str  # key of UPPER
    upper_colour: str
    stripe_colour: str  # "" when the upper garment is solid
    lower: str  # "none" (under a dress) or key of LOWER
    lower_colour: str
    shoes_colour: str
    bag: str  # "none" or key of BAGS
    bag_colour: str
    skin: int  # index into SKIN_TONES (never captioned)
    build: float  # shoulder width factor, 0.9-1.1 (never captioned)

    def to_json(self) -> dict:
        return asdict(self)

    def colours(self) -> set[str]:
        """Canonical garment colours worn (what a caption's colour words may refer to)."""
        worn = {self.upper_colour, self.shoes_colour}
        if self.stripe_colour:
            worn.add(self.stripe_colour)
        if self.lower != "none":
            worn.add(self.lower_colour)
        if self.headwear != "none":
            worn.add(self.headwear_colour)
        if self.bag != "none":
            worn.add(self.bag_colour)
        return worn


def node_weights(node_index: int | None) -> dict[str, dict[str, float]]:
    """BASE_WEIGHTS times the node's profile multipliers (`None`: the neutral source prior)."""
    weights = {k: dict(v) for k, v in BASE_WEIGHTS.items()}
    if node_index is None:
        return weights
    profile = NODE_PROFILES[node_index % len(NODE_PROFILES)]
    for group, mults in profile.items():
        for key, mult in mults.items():
            weights[group][key] *= mult
    return weights


def _pick(
    rng: np.random.Generator, weights: dict[str, float], exclude: tuple[str, ...] = ()
) -> str:
    keys = [k for k in weights if k not in exclude and weights[k] > 0]
    probs = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=probs / probs.sum()))]


def sample_identity(
    person_id: int, rng: np.random.Generator, weights: dict[str, dict[str, float]]
) -> Identity:
    """Draw one identity; dresses and skirts only for women, jeans in denim colours."""
    gender = "female" if rng.random() < 0.5 else "male"
    hair_w = dict(weights["hair_length"])
    hair_w["long"] *= 2.5 if gender == "female" else 0.25
    upper_excl = () if gender == "female" else ("dress",)
    upper = _pick(rng, weights["upper"], upper_excl)
    upper_colour = _pick(rng, weights["colour"])
    stripe = ""
    if upper in ("t-shirt", "shirt", "dress") and _pick(rng, weights["striped"]) == "yes":
        stripe = _pick(rng, weights["colour"], (upper_colour,))
    if upper == "dress":
        lower, lower_colour = "none", ""
    else:
        lower = _pick(rng, weights["lower"], () if gender == "female" else ("skirt",))
        if lower == "jeans":
            lower_colour = _pick(rng, weights["jeans_colour"])
        else:
            lower_colour = _pick(rng, weights["colour"], (upper_colour,))
    headwear = _pick(rng, weights["headwear"])
    bag = _pick(rng, weights["bag"])
    return Identity(
        person_id=person_id,
        gender=gender,
        hair_length=_pick(rng, hair_w),
        hair_colour=_pick(rng, weights["hair_colour"]),
        headwear=headwear,
        headwear_colour=_pick(rng, weights["colour"]) if headwear != "none" else "",
        upper=upper,
        upper_colour=upper_colour,
        stripe_colour=stripe,
        lower=lower,
        lower_colour=lower_colour,
        shoes_colour=_pick(rng, {"black": 4, "white": 3, "brown": 2, "grey": 1, "red": 0.5}),
        bag=bag,
        bag_colour=_pick(rng, weights["colour"]) if bag != "none" else "",
        skin=int(rng.integers(len(SKIN_TONES))),
        build=float(round(rng.uniform(0.9, 1.1), 3)),
    )
