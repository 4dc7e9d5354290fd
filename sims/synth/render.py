"""Draw one person crop from an `Identity`: pose, scale, position, occlusion, background.

The figure is drawn with PIL at twice the output size on its own transparent layer (so a
side view facing left is a mirror of one facing right), composited on the camera's
background, partially occluded now and then, reduced to the output size and finally passed
through the camera model. Everything random comes from the one `rng` handed in, so an image
is a pure function of its spec and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sims.synth.attributes import COLOURS, HAIR_COLOURS, SKIN_TONES, Identity
from sims.synth.cameras import CameraStyle, apply_camera, draw_background

VIEWS = ("front", "back", "side")
SUPERSAMPLE = 2

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Pose:
    """Per-image placement of the figure."""

    view: str  # front | back | side
    facing_left: bool  # side view only
    height: float  # figure height as a fraction of the crop height
    dx: float  # horizontal offset of the figure centre, fraction of crop width
    stride: float  # leg/arm swing, 0..1


def sample_pose(rng: np.random.Generator) -> Pose:
    return Pose(
        view=VIEWS[int(rng.choice(3, p=(0.4, 0.35, 0.25)))],
        facing_left=bool(rng.random() < 0.5),
        height=float(rng.uniform(0.78, 0.95)),
        dx=float(rng.uniform(-0.12, 0.12)),
        stride=float(rng.uniform(0.0, 1.0)),
    )


def next_frame(prev: Pose, rng: np.random.Generator) -> Pose:
    """The next crop of the same walk past a camera: same view and facing, a new step, a
    slightly different box (what a tracker hands over a few hundred ms later)."""
    return Pose(
        view=prev.view,
        facing_left=prev.facing_left,
        height=float(np.clip(prev.height + rng.uniform(-0.03, 0.03), 0.75, 0.97)),
        dx=float(np.clip(prev.dx + rng.uniform(-0.04, 0.04), -0.15, 0.15)),
        stride=float(rng.uniform(0.0, 1.0)),
    )


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def _garment(name: str, rng: np.random.Generator) -> RGB:
    """A worn colour with per-image fabric/lighting variation."""
    base = COLOURS[name][0]
    f = float(rng.uniform(0.88, 1.1))
    return tuple(int(np.clip(c * f + rng.integers(-10, 11), 0, 255)) for c in base)


class _Figure:
    """Coordinates in units of figure height: u right of centre, v down from the top."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, hp: float):
        self.draw, self.cx, self.top, self.hp = draw, cx, top, hp

    def p(self, u: float, v: float) -> tuple[float, float]:
        return (self.cx + u * self.hp, self.top + v * self.hp)

    def poly(self, pts: list[tuple[float, float]], fill: RGB) -> None:
        self.draw.polygon([self.p(u, v) for u, v in pts], fill=fill)

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], fill)

    def ellipse(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        self.draw.ellipse([self.p(u0, v0), self.p(u1, v1)], fill=fill)

    def chord(self, u0: float, v0: float, u1: float, v1: float, a0: float, a1: float, fill: RGB):
        self.draw.chord([self.p(u0, v0), self.p(u1, v1)], a0, a1, fill=fill)

    def pieslice(self, box: tuple[float, float, float, float], a0: float, a1: float, fill: RGB):
        u0, v0, u1, v1 = box
        self.draw.pieslice([self.p(u0, v0), self.p(u1, v1)], a0, a1, fill=fill)

    def line(self, pts: list[tuple[float, float]], fill: RGB, width: float) -> None:
        self.draw.line(
            [self.p(u, v) for u, v in pts], fill=fill, width=max(1, round(width * self.hp))
        )


SHOULDER_V, HIP_V, ANKLE_V = 0.16, 0.47, 0.93


def _draw_person(fig: _Figure, ident: Identity, pose: Pose, rng: np.random.Generator) -> None:
    side = pose.view == "side"
    skin = _shade(SKIN_TONES[ident.skin], float(rng.uniform(0.92, 1.05)))
    hair = _shade(HAIR_COLOURS[ident.hair_colour][0], float(rng.uniform(0.9, 1.1)))
    upper = _garment(ident.upper_colour, rng)
    stripe = _garment(ident.stripe_colour, rng) if ident.stripe_colour else None
    lower = _garment(ident.lower_colour, rng) if ident.lower != "none" else skin
    shoes = _garment(ident.shoes_colour, rng)
    bag = _garment(ident.bag_colour, rng) if ident.bag != "none" else None
    head = _garment(ident.headwear_colour, rng) if ident.headwear != "none" else None
    female = ident.gender == "female"
    sw = (0.06 if side else (0.095 if female else 0.112)) * ident.build  # shoulder half-width
    hw = 0.055 if side else (0.09 if female else 0.085)  # hip half-width

    def half_width(v: float) -> float:
        return sw + (hw - sw) * (v - SHOULDER_V) / (HIP_V - SHOULDER_V)

    # Behind the body: long hair (front view), hood, backpack seen from the side.
    if ident.hair_length == "long" and pose.view == "front":
        fig.rect(-0.065, 0.03, 0.065, 0.25, hair)
    if ident.upper == "hoodie" and pose.view == "front":
        fig.ellipse(-0.075, 0.0, 0.075, 0.17, _shade(upper, 0.8))
    if bag is not None and ident.bag == "backpack" and side:
        fig.rect(-sw - 0.075, 0.19, -sw + 0.01, 0.43, bag)

    # Legs: stride opens them in side view; skirts, shorts and dresses show skin below.
    s = pose.stride * (0.06 if side else 0.015)
    legs = [(-0.045 - s, 0.0 - s), (0.045 + s, 0.0 + s)] if not side else [(-s, -s), (s, s)]
    leg_colour_to = {"shorts": 0.64, "skirt": 0.5, "none": 0.5}.get(ident.lower, ANKLE_V)
    for hip_u, foot_shift in legs:
        foot_u = hip_u + foot_shift * 1.5
        for v0, v1, colour in (
            (HIP_V - 0.02, leg_colour_to, lower),
            (leg_colour_to, ANKLE_V, skin),
        ):
            if v1 <= v0:
                continue
            t0 = (v0 - HIP_V) / (ANKLE_V - HIP_V)
            t1 = (v1 - HIP_V) / (ANKLE_V - HIP_V)
            u0 = hip_u + (foot_u - hip_u) * max(t0, 0)
            u1 = hip_u + (foot_u - hip_u) * t1
            w0, w1 = 0.04 - 0.008 * max(t0, 0), 0.04 - 0.008 * t1
            fig.poly([(u0 - w0, v0), (u0 + w0, v0), (u1 + w1, v1), (u1 - w1, v1)], colour)
        if ident.lower == "jeans":
            fig.line([(hip_u, HIP_V + 0.02), (foot_u, ANKLE_V - 0.01)], _shade(lower, 1.25), 0.006)
        toe = 0.05 if side else 0.0
        fig.ellipse(foot_u - 0.04, ANKLE_V - 0.015, foot_u + 0.04 + toe, ANKLE_V + 0.045, shoes)

    # Torso, with the long garments and skirts hanging from it.
    fig.poly([(-sw, SHOULDER_V), (sw, SHOULDER_V), (hw, HIP_V), (-hw, HIP_V)], upper)
    if ident.lower == "skirt":
        fig.poly(
            [(-hw, HIP_V - 0.01), (hw, HIP_V - 0.01), (hw + 0.05, 0.7), (-hw - 0.05, 0.7)], lower
        )
    if ident.upper == "dress":
        fig.poly(
            [(-hw, HIP_V - 0.02), (hw, HIP_V - 0.02), (hw + 0.06, 0.72), (-hw - 0.06, 0.72)], upper
        )
    if ident.upper == "coat":
        fig.poly(
            [(-hw, HIP_V - 0.02), (hw, HIP_V - 0.02), (hw + 0.03, 0.7), (-hw - 0.03, 0.7)], upper
        )
    if stripe is not None:
        bottom = 0.72 if ident.upper == "dress" else HIP_V
        v = SHOULDER_V + 0.03
        while v < bottom - 0.01:
            a = half_width(min(v, HIP_V)) + (0.06 * (v - HIP_V) / 0.25 if v > HIP_V else 0)
            b = half_width(min(v + 0.022, HIP_V)) + (0.06 * (v - HIP_V) / 0.25 if v > HIP_V else 0)
            fig.poly([(-a, v), (a, v), (b, v + 0.022), (-b, v + 0.022)], stripe)
            v += 0.055
    dark = _shade(upper, 0.7)
    if pose.view == "front":
        if ident.upper in ("jacket", "coat"):
            end = 0.7 if ident.upper == "coat" else HIP_V
            fig.line([(0.0, SHOULDER_V + 0.01), (0.0, end)], dark, 0.012)
        if ident.upper == "coat":
            for bv in (0.26, 0.36, 0.46, 0.56):
                fig.ellipse(0.012, bv, 0.026, bv + 0.014, dark)
        if ident.upper == "shirt":
            fig.poly(
                [(-0.035, SHOULDER_V - 0.005), (0.0, 0.21), (0.035, SHOULDER_V - 0.005)],
                _shade(upper, 1.3),
            )
            for bv in (0.24, 0.31, 0.38):
                fig.ellipse(-0.006, bv, 0.006, bv + 0.012, dark)
        if ident.upper == "hoodie":
            fig.rect(-0.06, 0.36, 0.06, 0.44, dark)
            fig.line([(-0.02, 0.17), (-0.022, 0.25)], _shade(upper, 1.4), 0.006)
            fig.line([(0.02, 0.17), (0.022, 0.25)], _shade(upper, 1.4), 0.006)
    if ident.upper == "hoodie" and pose.view == "back":
        fig.chord(-0.07, 0.1, 0.07, 0.26, 0, 180, dark)

    # Arms: sleeves in the garment colour, skin below short sleeves, a hand at the end.
    short_sleeve = ident.upper in ("t-shirt", "dress")
    swing = (pose.stride - 0.5) * (0.12 if side else 0.02)
    arm_us = [0.0] if side else [-sw - 0.022, sw + 0.022]
    for i, au in enumerate(arm_us):
        out = (-1 if i == 0 else 1) * (0.0 if side else 0.012)
        hand_u = au + out + swing * (1 if i == 0 else -1)
        elbow = (au + (hand_u - au) * 0.45, 0.31)
        sleeve_end = 0.25 if short_sleeve else 0.46
        sleeve_pts = (
            [(au, SHOULDER_V + 0.01), elbow]
            if short_sleeve
            else [(au, SHOULDER_V + 0.01), elbow, (hand_u, sleeve_end)]
        )
        if short_sleeve:
            fig.line([(au, SHOULDER_V + 0.01), elbow, (hand_u, 0.46)], skin, 0.038)
            fig.line([(au, SHOULDER_V + 0.01), (au + (elbow[0] - au) * 0.6, 0.25)], upper, 0.05)
        else:
            fig.line(sleeve_pts, upper, 0.045)
            if stripe is not None:
                fig.line([(au, 0.22), (au + (elbow[0] - au) * 0.6, 0.25)], stripe, 0.045)
        fig.ellipse(hand_u - 0.022, 0.45, hand_u + 0.022, 0.495, skin)

    # Bags.
    if bag is not None:
        if ident.bag == "backpack" and pose.view == "back":
            fig.rect(-0.085, 0.19, 0.085, 0.43, bag)
            fig.rect(-0.06, 0.33, 0.06, 0.41, _shade(bag, 0.75))
        elif ident.bag == "backpack" and pose.view == "front":
            for u in (-sw + 0.03, sw - 0.03):
                fig.line([(u, SHOULDER_V), (u * 0.9, 0.34)], bag, 0.022)
        elif ident.bag == "handbag":
            u = (sw + 0.03) if not side else 0.02
            fig.line([(u, 0.41), (u + 0.03, 0.37), (u + 0.06, 0.41)], _shade(bag, 0.8), 0.008)
            fig.rect(u - 0.01, 0.41, u + 0.07, 0.5, bag)
        elif ident.bag == "shoulder bag":
            if not side:
                fig.line([(-sw + 0.02, SHOULDER_V), (hw - 0.01, 0.42)], bag, 0.016)
                fig.rect(hw - 0.03, 0.4, hw + 0.06, 0.49, bag)
            else:
                fig.line([(0.0, SHOULDER_V), (-0.01, 0.42)], bag, 0.016)
                fig.rect(-0.06, 0.4, 0.03, 0.49, bag)

    # Head, hair, headwear.
    fig.rect(-0.02, 0.12, 0.02, 0.17, skin)
    hx0, hy0, hx1, hy1 = -0.05, 0.015, 0.05, 0.135
    fig.ellipse(hx0, hy0, hx1, hy1, skin)
    if pose.view == "back":
        fig.ellipse(hx0 - 0.004, hy0 - 0.004, hx1 + 0.004, hy1, hair)
        if ident.hair_length == "long":
            fig.rect(-0.055, 0.08, 0.055, 0.26, hair)
    elif side:
        fig.pieslice((hx0 - 0.004, hy0 - 0.006, hx1 + 0.002, hy1), 100, 345, hair)
        if ident.hair_length == "long":
            fig.rect(-0.055, 0.07, -0.005, 0.25, hair)
        fig.ellipse(0.025, 0.06, 0.035, 0.07, (30, 24, 20))
    else:
        fig.chord(hx0 - 0.005, hy0 - 0.008, hx1 + 0.005, hy1 - 0.03, 175, 365, hair)
        if ident.hair_length == "long":
            fig.rect(hx0 - 0.006, 0.05, hx0 + 0.012, 0.2, hair)
            fig.rect(hx1 - 0.012, 0.05, hx1 + 0.006, 0.2, hair)
        for eu in (-0.022, 0.012):
            fig.ellipse(eu, 0.065, eu + 0.01, 0.075, (30, 24, 20))
    if head is not None:
        if ident.headwear == "beanie":
            fig.chord(hx0 - 0.008, hy0 - 0.02, hx1 + 0.008, hy1 - 0.02, 170, 370, head)
            fig.rect(hx0 - 0.008, 0.05, hx1 + 0.008, 0.068, _shade(head, 0.8))
        elif ident.headwear == "cap":
            fig.chord(hx0 - 0.004, hy0 - 0.012, hx1 + 0.004, hy1 - 0.03, 175, 365, head)
            if side:
                fig.rect(0.03, 0.045, 0.09, 0.058, _shade(head, 0.85))
            elif pose.view == "front":
                fig.ellipse(hx0 - 0.004, 0.04, hx1 + 0.004, 0.062, _shade(head, 0.85))
        else:  # hat: crown and a wide brim
            fig.chord(hx0 + 0.004, hy0 - 0.03, hx1 - 0.004, hy1 - 0.03, 180, 360, head)
            fig.ellipse(hx0 - 0.04, 0.035, hx1 + 0.04, 0.06, _shade(head, 0.85))


def _draw_occluder(img: Image.Image, rng: np.random.Generator) -> None:
    """A pole, a low obstacle (car, bench) or a passer-by cut by the crop border."""
    w, h = img.size
    d = ImageDraw.Draw(img)
    kind = int(rng.integers(3))
    colour = tuple(int(c) for c in rng.integers(30, 200, size=3))
    if kind == 0:
        x = rng.uniform(0.1, 0.9) * w
        half = rng.uniform(0.05, 0.09) * w
        d.rectangle([x - half, 0, x + half, h], fill=colour)
    elif kind == 1:
        d.rectangle([0, rng.uniform(0.72, 0.85) * h, w, h], fill=colour)
    else:
        left = rng.random() < 0.5
        x = (rng.uniform(-0.05, 0.12) if left else rng.uniform(0.88, 1.05)) * w
        top = rng.uniform(0.1, 0.25) * h
        other = tuple(int(c) for c in rng.integers(20, 235, size=3))
        d.ellipse([x - 0.1 * w, top, x + 0.1 * w, top + 0.12 * h], fill=(200, 160, 130))
        d.rectangle([x - 0.22 * w, top + 0.13 * h, x + 0.22 * w, top + 0.5 * h], fill=colour)
        d.rectangle([x - 0.16 * w, top + 0.5 * h, x + 0.16 * w, h], fill=other)


def render_crop(
    ident: Identity,
    pose: Pose,
    style: CameraStyle,
    size: tuple[int, int],
    rng: np.random.Generator,
    occlusion: float = 0.25,
) -> Image.Image:
    """The final (H, W) crop as `style`'s camera records it (not yet JPEG-encoded)."""
    h, w = size
    big = (w * SUPERSAMPLE, h * SUPERSAMPLE)
    # The background is drawn at output size (textures need no supersampling) and upscaled.
    scene = Image.fromarray(draw_background(style, (h, w), rng)).resize(
        big, Image.Resampling.NEAREST
    )
    layer = Image.new("RGBA", big, (0, 0, 0, 0))
    height, top_at = _detector_box(style.crop, pose.height, rng)
    hp = height * big[1]
    cx = big[0] * (0.5 + pose.dx)
    mirrored = pose.view == "side" and pose.facing_left
    if mirrored:
        cx = big[0] - cx
    top = (
        (big[1] - hp) * top_at
        if top_at is not None
        else (big[1] - hp) * float(rng.uniform(0.2, 0.8))
    )
    _draw_person(_Figure(ImageDraw.Draw(layer), cx, top, hp), ident, pose, rng)
    if mirrored:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scene.paste(layer, (0, 0), layer)
    if rng.random() < (style.occlusion if style.occlusion >= 0 else occlusion):
        _draw_occluder(scene, rng)
    img = scene.reduce(SUPERSAMPLE)
    person = None
    if style.backlight > 0:
        alpha = layer.getchannel("A").reduce(SUPERSAMPLE)
        person = np.asarray(alpha, dtype=np.float32) / 255.0
    return apply_camera(img, style, rng, person)


def _detector_box(crop: str, height: float, rng: np.random.Generator) -> tuple[float, float | None]:
    """(figure height as a share of the crop, vertical placement or None = random) for a
    camera's detector style: tight boxes clip head and feet, loose ones hold more scene,
    truncated ones lose the legs at the frame's edge."""
    if crop == "tight":
        return height * float(rng.uniform(1.04, 1.12)), 0.5
    if crop == "loose":
        return height * float(rng.uniform(0.62, 0.75)), None
    if crop == "truncated":
        return height * float(rng.uniform(1.3, 1.5)), 0.05
    return height, None
