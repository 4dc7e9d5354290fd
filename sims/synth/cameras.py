"""Per-camera appearance: lighting, colour cast, optics, sensor, compression, background.

Real camera networks differ in exactly these ways (a sodium street lamp turns a white shirt
orange, an LED flood light turns it blue, a cheap dome camera blurs and compresses), and that
difference is what federated fine-tuning has to absorb. Each target camera gets one of
eight "looks", scaled by the shift level; the `source` cameras all use the neutral look,
which is what the base model sees.

Three sets of looks: `v2` (LOOKS_V2) is strong coloured light, which is mostly a per-channel
gain that a per-camera gray-world white balance removes without any learning (DESIGN.md
section 9). `v3` (LOOKS_V3) is built from CCTV failure modes that no global per-camera colour
transform undoes: near-infrared night mode, light that changes colour across the frame,
vignetting, hard shadows, backlight, glare, overhead foreshortening, motion blur, blocky low
resolution, and per-camera detector crop styles and occlusion; most of them destroy what a
model would need, so fine-tuning gains little on it. `v4` (LOOKS_V4, the default) keeps what
was learnable: two roughly complementary lights across every frame plus the camera's
exposure curve, which neither a per-camera nor a per-image gray-world gain undoes. `v5`
(LOOKS_V5) turns each site's hues about the grey axis; a hue-histogram alignment undoes it.
`v6` (LOOKS_V6) is v5 over vivid scenes that lead that alignment astray; aligning on the
person's pixels alone still undoes most of it (docs/benchmark.md).
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

SHIFT_LEVELS = {"none": 0.0, "mild": 0.55, "strong": 1.0}

BACKGROUND_KINDS = ("brick", "tiles", "grass", "pavement", "plain")


@dataclass(frozen=True)
class CameraStyle:
    """How one camera renders the world; `strength` 0 is the neutral camera."""

    camera_id: str
    look: str
    gain: float = 1.0  # global illumination multiplier
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel multipliers (white balance)
    haze: float = 0.0  # blend towards a flat grey (low contrast)
    desaturate: float = 0.0  # 0 full colour, 1 grey
    gamma: float = 1.0
    blur: float = 0.0  # Gaussian radius in pixels
    downscale: float = 1.0  # resolution loss factor (>=1)
    noise: float = 2.0  # sensor noise sigma in 0..255 units
    jpeg_quality: int = 92
    background: str = ""  # "" = a random neutral background per image, else a kind
    bg_colours: tuple[tuple[int, int, int], ...] = ()
    # v3: effects a per-camera colour gain cannot undo (0 / neutral = off)
    nir: float = 0.0  # blend to near-infrared monochrome (dyes look alike, skin glows)
    split_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the other light, across the frame
    split_axis: str = "x"  # its edge runs across x (a light at the side) or y (from above)
    vignette: float = 0.0  # radial fall-off strength (an IR illuminator's hot spot)
    shadow: float = 0.0  # darkness of a hard shadow band crossing the crop
    backlight: float = 0.0  # person darkened, background washed out (an entrance door)
    glare: float = 0.0  # a bright bloom from a lamp in view
    overhead: float = 0.0  # vertical foreshortening of a high dome camera
    motion_blur: float = 0.0  # horizontal smear in pixels (slow shutter, walking person)
    block_quality: int = 0  # JPEG quality at the reduced resolution (blocks), 0 = off
    crop: str = "normal"  # detector box style: normal | tight | loose | truncated
    occlusion: float = -1.0  # per-camera occluder probability, < 0 = the dataset's rate
    # v5: hue turned about the grey axis, in degrees (a drifted colour-correction matrix or
    # a decoder reading the wrong channel order): grey stays grey, so no gain or level undoes it
    hue: float = 0.0


# name -> full-strength parameters; strength scales their distance from neutral.
#
# The looks are strong coloured lighting with light optical damage. That is on purpose: a
# shift must be large enough to hurt a base model trained on neutral cameras (zero-shot)
# and still *learnable* from the target cameras' own crops, or fine-tuning has nothing to
# gain. An earlier set that destroyed information (very dark, heavy noise, JPEG q40, 3x
# resolution loss) cost the base model little more than it cost any fine-tuned model: the
# centralised LoRA gained only +4..6 Rank-1 (docs/benchmark.md). Casts pointing in eight
# directions also make the nodes non-IID in appearance: a node that adapts to its own
# two lights learns little about the other nodes' six.
LOOKS_V2: dict[str, dict] = {
    # low-pressure sodium street lamps: nearly monochrome orange, blue almost gone
    "sodium-night": dict(cast=(1.0, 0.6, 0.2), noise=5, blur=0.5, jpeg_quality=75),
    # blue LED flood lights at a loading bay
    "blue-led": dict(cast=(0.3, 0.6, 1.0), gain=1.1, noise=4, jpeg_quality=80),
    # old fluorescent tubes in an underground car park
    "green-fluorescent": dict(cast=(0.45, 1.0, 0.35), noise=4, jpeg_quality=80),
    # a day/night camera whose IR-cut filter is stuck: magenta skin and foliage
    "magenta-ir": dict(cast=(1.0, 0.3, 0.9), noise=4, jpeg_quality=80),
    # indoor tungsten light, dim
    "warm-tungsten": dict(cast=(1.0, 0.75, 0.35), gain=0.8, noise=4, jpeg_quality=80),
    # a cheap cool-white LED camera with a soft lens
    "cyan-led": dict(cast=(0.25, 0.9, 1.0), noise=4, downscale=1.6, jpeg_quality=80),
    # amber security lighting
    "amber-security": dict(cast=(1.0, 0.85, 0.1), noise=4, jpeg_quality=80),
    # purple decorative LEDs at a venue entrance
    "violet-led": dict(cast=(0.6, 0.3, 1.0), noise=4, jpeg_quality=80),
}

# v3: one CCTV failure mode (or two) per camera, each undone by no per-camera colour gain.
# Colour casts stay mild: where one is present it rides on top of a spatial effect.
LOOKS_V3: dict[str, dict] = {
    # IR-cut filter out, IR illuminator on: monochrome, bright centre, dark corners
    "nir-night": dict(nir=1.0, vignette=0.55, noise=6, blur=0.6, jpeg_quality=70),
    # a shop window's warm light on one side, a cool street lamp on the other
    "mixed-light": dict(
        cast=(1.0, 0.75, 0.5), split_cast=(0.45, 0.8, 1.0), noise=4, jpeg_quality=80
    ),
    # a glass entrance door: bright daylight behind, the person in shadow
    "backlit-entrance": dict(backlight=0.75, glare=0.5, crop="loose", noise=4, jpeg_quality=80),
    # a dome high above a corridor: heads big, legs short, tight detector boxes
    "overhead-dome": dict(
        overhead=0.55, vignette=0.3, crop="tight", cast=(0.9, 1.0, 0.85), noise=4, jpeg_quality=80
    ),
    # a 2009 analogue camera through an encoder: tiny, blocky, legs cut by the frame
    "legacy-lowres": dict(
        downscale=2.6, block_quality=40, crop="truncated", noise=5, jpeg_quality=75
    ),
    # a dim corridor with a slow shutter and pillars casting hard shadows
    "motion-corridor": dict(
        motion_blur=5.0, shadow=0.65, gain=0.85, cast=(0.85, 1.0, 0.8), noise=5, jpeg_quality=78
    ),
    # low-pressure sodium at night: one wavelength, colour all but gone
    "sodium-mono": dict(
        desaturate=0.7, cast=(1.0, 0.7, 0.35), vignette=0.35, noise=6, jpeg_quality=72
    ),
    # a busy platform in harsh sun: washed out, hard shadows, people in the way
    "crowded-glare": dict(
        haze=0.3, gamma=0.65, glare=0.6, shadow=0.5, occlusion=0.6, noise=4, jpeg_quality=80
    ),
}


# v4: two lights across every frame plus the camera's exposure curve. Mixed lighting is the
# norm in a street at night (a sodium lamp on one side, a shop's LED sign on the other): a
# jacket's colour depends on where in the frame it is, and on which way the person walks.
# The two lights of a camera are roughly complementary, so its mean colour is near grey and
# a per-camera (or per-image) gray-world gain has almost nothing to correct; the exposure
# curve (a night exposure crushing the shadows, gamma > 1, or a wide-dynamic-range / dirty
# dome washing everything out, haze and gamma < 1) is not a gain at all. Neither destroys
# information, so a model that sees these cameras can learn them (docs/benchmark.md).
def _two_lights(
    cast: tuple[float, float, float],
    second: tuple[float, float, float],
    axis: str = "x",
    **exposure: float,
) -> dict:
    return dict(cast=cast, split_cast=second, split_axis=axis, noise=4, jpeg_quality=80, **exposure)


# name: (first light, second light across the frame, edge axis, exposure curve)
LOOKS_V4: dict[str, dict] = {
    # a sodium street lamp on one side, a cool LED shop sign on the other; underexposed
    "sodium-and-led-street": _two_lights((1.0, 0.6, 0.2), (0.24, 0.62, 1.0), gamma=1.6),
    # blue loading-bay flood lights, a warm doorway light from above; washed-out WDR
    "loading-bay-door": _two_lights((0.3, 0.6, 1.0), (1.0, 0.68, 0.26), "y", haze=0.25, gamma=0.6),
    # green fluorescent car-park tubes beside a magenta advertising panel; washed out
    "car-park-billboard": _two_lights((0.45, 1.0, 0.35), (0.89, 0.28, 1.0), haze=0.25, gamma=0.6),
    # a stuck IR-cut filter (magenta) under a green exit sign above; dark
    "stuck-ir-cut-exit-sign": _two_lights((1.0, 0.3, 0.9), (0.26, 1.0, 0.37), "y", gamma=1.7),
    # a shop window's tungsten light and the blue street outside; very dark
    "shop-window-street": _two_lights((1.0, 0.75, 0.35), (0.28, 0.56, 1.0), gamma=1.8),
    # a cheap cyan LED camera under a red neon sign above; hazy dome
    "neon-underpass": _two_lights((0.25, 0.9, 1.0), (1.0, 0.35, 0.25), "y", haze=0.3, gamma=0.55),
    # amber security lighting beside a blue LED gate light; hazy and dark
    "amber-gate": _two_lights((1.0, 0.85, 0.1), (0.22, 0.35, 1.0), haze=0.3, gamma=1.5),
    # violet venue LEDs with green stage light from above; dark
    "venue-entrance": _two_lights((0.6, 0.3, 1.0), (0.68, 1.0, 0.26), "y", gamma=1.4),
}


# v5 (selectable, not the default): every site's colours turned about the grey axis by its
# own angle, the same for both of its cameras (one recorder per site). An RTSP decoder that
# reads BGR as RGB, a colour-correction matrix from another sensor: the scene's greys stay
# grey, so a per-camera gain or level has nothing to correct, yet every colour word lands on
# another hue; a turn loses nothing, so a model that sees the site's crops can learn it. But a
# per-camera hue-histogram alignment to the source split (label-free, no training) finds most
# of the angles and beats centralised LoRA (docs/benchmark.md, "v5: hue turns"), so v5 is kept
# as a measured negative result, like v2.
def _turned(hue: float) -> dict:
    return dict(hue=hue, noise=4, jpeg_quality=80)


LOOKS_V5: dict[str, dict] = {
    "bgr-decoder-street": _turned(180.0),
    "bgr-decoder-loading-bay": _turned(180.0),
    "ccm-drift-car-park": _turned(90.0),
    "ccm-drift-exit": _turned(90.0),
    "wrong-preset-shop": _turned(-90.0),
    "wrong-preset-underpass": _turned(-90.0),
    "grb-decoder-gate": _turned(120.0),
    "grb-decoder-venue": _turned(120.0),
}


# v6 (selectable, not the default): v5's turns, each camera over a vivid scene of its own (a
# green hedge, a red brick wall, a blue-painted underpass): a scene filling half the crop in
# one saturated colour leads every per-camera colour statistic astray, as it leads real auto
# white balance. Camera normalisation recovers 9% of the centralised gain, a whole-crop hue
# alignment 58%, the same alignment on the middle of the crops (the person) 93%: kept as a
# measured negative result, like v5 (docs/benchmark.md, "v6").
def _turned_scene(hue: float, scene_hue: float) -> dict:
    return dict(hue=hue, scene_hue=scene_hue, noise=4, jpeg_quality=80)


LOOKS_V6: dict[str, dict] = {
    "bgr-decoder-hedge": _turned_scene(180.0, 110.0),
    "bgr-decoder-brick": _turned_scene(180.0, 10.0),
    "ccm-drift-underpass": _turned_scene(90.0, 220.0),
    "ccm-drift-tiles": _turned_scene(90.0, 50.0),
    "wrong-preset-lawn": _turned_scene(-90.0, 95.0),
    "wrong-preset-mural": _turned_scene(-90.0, 300.0),
    "grb-decoder-awning": _turned_scene(120.0, 0.0),
    "grb-decoder-pool": _turned_scene(120.0, 190.0),
}
LOOK_SETS = {"v2": LOOKS_V2, "v3": LOOKS_V3, "v4": LOOKS_V4, "v5": LOOKS_V5, "v6": LOOKS_V6}

_NEUTRAL = CameraStyle(camera_id="", look="neutral")


def make_camera_style(
    camera_id: str, index: int, shift: str, rng: np.random.Generator, looks: str = "v4"
) -> CameraStyle:
    """Camera `index` gets look `index % 8` of set `looks`, jittered by `rng`, scaled by the
    shift level."""
    strength = SHIFT_LEVELS[shift]
    if strength == 0.0:
        return CameraStyle(camera_id=camera_id, look="neutral")
    table = LOOK_SETS[looks]
    names = list(table)
    look = names[index % len(names)]
    params = table[look]

    def lerp(field: str) -> float:
        neutral = getattr(_NEUTRAL, field)
        full = params.get(field, neutral) * float(rng.uniform(0.9, 1.1))
        return neutral + strength * (full - neutral)

    def lerp_rgb(field: str) -> tuple[float, float, float]:
        if field not in params:  # exactly neutral: a jittered (1, 1, 1) is a light too
            return (1.0, 1.0, 1.0)
        rgb = params[field]
        return tuple(1.0 + strength * (c * float(rng.uniform(0.95, 1.05)) - 1.0) for c in rgb)

    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    bg = tuple(_muted(rng) for _ in range(3))
    # drawn in v2's order, so a v2 camera's parameters (and bytes) stay what they were
    common = {"gain": lerp("gain"), "cast": lerp_rgb("cast")}
    for name in ("haze", "desaturate", "gamma", "blur", "downscale", "noise", "jpeg_quality"):
        common[name] = lerp(name)
    common["downscale"] = max(1.0, common["downscale"])
    common["jpeg_quality"] = round(common["jpeg_quality"])
    v3 = {}
    if looks != "v2":
        block = params.get("block_quality", 0)
        v3 = dict(
            nir=min(1.0, lerp("nir")),
            split_cast=lerp_rgb("split_cast"),
            split_axis=params.get("split_axis", "x"),
            vignette=lerp("vignette"),
            shadow=min(0.9, lerp("shadow")),
            backlight=min(0.9, lerp("backlight")),
            glare=lerp("glare"),
            overhead=lerp("overhead"),
            motion_blur=lerp("motion_blur"),
            block_quality=round(100 - strength * (100 - block)) if block else 0,
            crop=params.get("crop", "normal") if strength >= 0.5 else "normal",
            occlusion=params.get("occlusion", -1.0),
        )
    if "hue" in params:
        v3["hue"] = strength * params["hue"] + float(rng.uniform(-8.0, 8.0))
    if "scene_hue" in params:
        bg = tuple(_vivid(params["scene_hue"] + float(rng.uniform(-15, 15)), rng) for _ in range(3))
    return CameraStyle(
        camera_id=camera_id, look=look, background=kind, bg_colours=bg, **common, **v3
    )


def neutral_style(camera_id: str) -> CameraStyle:
    """The source cameras' style: neutral light, random neutral backgrounds."""
    return CameraStyle(camera_id=camera_id, look="neutral")


def draw_background(
    style: CameraStyle, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A (H, W, 3) uint8 scene: a textured wall or field above a ground plane."""
    h, w = size
    if style.background:
        kind, colours = style.background, style.bg_colours
        colours = tuple(_jitter_colour(c, rng, 12) for c in colours)
    else:
        kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
        colours = tuple(_muted(rng) for _ in range(3))
    y, x = np.mgrid[0:h, 0:w]
    wall = np.array(colours[0], np.float32)
    alt = np.array(colours[1], np.float32)
    img = np.empty((h, w, 3), np.float32)
    oy, ox = int(rng.integers(0, 64)), int(rng.integers(0, 64))
    if kind == "brick":
        bh, bw = max(3, h // 16), max(6, w // 5)
        row = (y + oy) // bh
        xs = x + ox + (row % 2) * (bw // 2)
        mortar = ((y + oy) % bh == 0) | (xs % bw == 0)
        shade = ((row * 7 + xs // bw * 13) % 5)[..., None] * 6.0
        img[:] = wall + shade
        img[mortar] = alt
    elif kind == "tiles":
        t = max(4, w // 6)
        checker = (((y + oy) // t + (x + ox) // t) % 2).astype(bool)
        img[:] = wall
        img[checker] = alt
    elif kind == "grass":
        streak = rng.normal(0.0, 18.0, size=(1, w, 1)).astype(np.float32)
        img[:] = wall + streak + rng.normal(0.0, 10.0, size=(h, w, 1)).astype(np.float32)
    elif kind == "pavement":
        img[:] = wall + rng.normal(0.0, 8.0, size=(h, w, 1)).astype(np.float32)
        img[(x + ox) % max(8, w // 3) < 2] = alt
    else:  # plain wall with a vertical light gradient
        img[:] = wall * (0.8 + 0.3 * (y / h))[..., None]
    horizon = int(h * rng.uniform(0.55, 0.72))
    ground = np.array(colours[2], np.float32)
    img[horizon:] = ground + rng.normal(0.0, 6.0, size=(h - horizon, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A street-scene colour: a grey level with a slight tint (walls, paving, grass, tiles)."""
    grey = int(rng.integers(50, 200))
    return tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-30, 31, size=3))


def _vivid(hue: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated scene colour of `hue` degrees (a hedge, a painted wall)."""
    sat, val = float(rng.uniform(0.55, 0.8)), float(rng.uniform(0.45, 0.85))
    r, g, b = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def _jitter_colour(
    colour: tuple[int, int, int], rng: np.random.Generator, amount: int
) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def apply_camera(
    img: Image.Image,
    style: CameraStyle,
    rng: np.random.Generator,
    person: np.ndarray | None = None,
) -> Image.Image:
    """Optics, resolution, light and sensor noise of `style`, with a small per-frame jitter.

    `person`: the figure's (H, W) coverage in 0..1, for effects that treat the person and
    the scene differently (backlight). The v2 effects run in v2's order with v2's draws, so
    a v2 camera renders the same bytes as before; each v3 effect draws only when it is on.
    """
    w, h = img.size
    if style.overhead > 0.01:
        img, person = _foreshorten(img, person, style.overhead)
    x = None
    if style.motion_blur > 0.5:
        x = _smear(np.asarray(img, dtype=np.float32), style.motion_blur)
        img = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))
    if style.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(style.blur))
    if style.downscale > 1.05:
        small = (max(4, round(w / style.downscale)), max(4, round(h / style.downscale)))
        img = img.resize(small, Image.Resampling.BILINEAR)
        if style.block_quality:  # an encoder at the camera's own tiny resolution: blocks
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=style.block_quality)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
            img = img.resize((w, h), Image.Resampling.NEAREST)
        else:
            img = img.resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = _scene_light(x, style, rng, person)
    gain = style.gain * float(rng.uniform(0.9, 1.1))
    x = x * (gain * np.asarray(style.cast, np.float32))
    if style.split_cast != (1.0, 1.0, 1.0):
        x = x * _split_light(
            style.cast, style.split_cast, style.split_axis, rng, w if style.split_axis == "x" else h
        )
    if abs(style.hue) > 0.5:
        x = np.clip(x, 0.0, None) @ turn_about_grey(style.hue).astype(np.float32).T
    if style.nir > 0:
        grey = x @ np.array([0.4, 0.4, 0.2], np.float32)
        glow = 0.25 + 0.75 * np.clip(grey, 0, 1) ** 0.7  # dark dyes reflect NIR: little contrast
        x = x + style.nir * (glow[..., None] - x)
    if style.desaturate > 0:
        grey = x.mean(axis=2, keepdims=True)
        x = x + style.desaturate * (grey - x)
    if style.haze > 0:
        x = x + style.haze * (0.6 - x)
    x = np.clip(x, 0.0, 1.0)
    if abs(style.gamma - 1.0) > 1e-3:
        x = x**style.gamma
    x = x * 255.0 + rng.normal(0.0, style.noise, size=x.shape).astype(np.float32)
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))


def _scene_light(
    x: np.ndarray, style: CameraStyle, rng: np.random.Generator, person: np.ndarray | None
) -> np.ndarray:
    """Light that varies across the frame: backlight, shadow band, glare, vignette."""
    h, w = x.shape[:2]
    y, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx + 0.5) / w, (y + 0.5) / h
    if style.backlight > 0 and person is not None:
        m = person[..., None]
        b = style.backlight * float(rng.uniform(0.85, 1.1))
        lit_bg = x + 0.8 * b * (1.0 - x)  # bright daylight behind the door
        x = m * x * (1.0 - b) + (1.0 - m) * lit_bg
    if style.shadow > 0:
        angle = float(rng.uniform(-0.9, 0.9))
        centre, width = float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.18, 0.35))
        d = (v - centre) * np.cos(angle) + (u - 0.5) * 0.5 * np.sin(angle)
        band = np.clip((width / 2 - np.abs(d)) * h / 1.5, 0, 1)  # hard edge, ~1.5 px soft
        x = x * (1.0 - style.shadow * band)[..., None]
    if style.glare > 0:
        gx, gy = float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 0.4))
        r2 = ((u - gx) * w / h) ** 2 + (v - gy) ** 2
        bloom = style.glare * np.exp(-r2 / (2 * 0.12**2))
        x = x + bloom[..., None] * (1.2 - x)
    if style.vignette > 0:
        r2 = ((u - 0.5) * 2) ** 2 * 0.6 + ((v - 0.5) * 2) ** 2 * 0.4
        x = x * np.clip(1.0 - style.vignette * r2, 0.08, 1.0)[..., None]
    return x


def _split_light(
    cast: tuple[float, float, float],
    second: tuple[float, float, float],
    axis: str,
    rng: np.random.Generator,
    n: int,
) -> np.ndarray:
    """Multiplier turning `cast` into `second` across a soft, moving edge along `axis`
    (`n` pixels long)."""
    edge, soft = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.08, 0.2))
    u = (np.arange(n, dtype=np.float32) + 0.5) / n
    t = 1.0 / (1.0 + np.exp(-(u - edge) / soft))
    if rng.random() < 0.5:
        t = 1.0 - t
    ratio = np.asarray(second, np.float32) / np.maximum(np.asarray(cast, np.float32), 1e-3)
    m = (1.0 - t)[:, None] + t[:, None] * ratio[None, :]
    return m[None, :, :] if axis == "x" else m[:, None, :]


def turn_about_grey(degrees: float) -> np.ndarray:
    """The 3x3 rotation about the grey axis (1, 1, 1) by `degrees` (Rodrigues), float64:
    grey stays grey. v5/v6 render with it; the hue-alignment baseline undoes it."""
    k = np.full(3, 1.0 / np.sqrt(3.0))
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def _foreshorten(
    img: Image.Image, person: np.ndarray | None, amount: float
) -> tuple[Image.Image, np.ndarray | None]:
    """A high camera looking down: the top of the crop (head) stretched, the legs squeezed."""
    x = np.asarray(img)
    h = x.shape[0]
    rows = np.clip(((np.arange(h) + 0.5) / h) ** (1.0 + amount) * h, 0, h - 1).astype(int)
    out = Image.fromarray(np.ascontiguousarray(x[rows]))
    return out, (None if person is None else person[rows])


def _smear(x: np.ndarray, length: float) -> np.ndarray:
    """Horizontal box blur of about `length` pixels (a moving person, a slow shutter)."""
    n = max(2, round(length))
    pad = np.pad(x, ((0, 0), (n, n), (0, 0)), mode="edge")
    c = np.cumsum(pad, axis=1, dtype=np.float64)
    lo = n // 2
    out = (c[:, n + lo : n + lo + x.shape[1]] - c[:, lo : lo + x.shape[1]]) / n
    return out.astype(np.float32)
