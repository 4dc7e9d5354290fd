"""Per-camera appearance: lighting, colour cast, optics, sensor, compression, background.

Real camera networks differ in exactly these ways (a sodium street lamp turns a white shirt
orange, an LED flood light turns it blue, a cheap dome camera blurs and compresses), and that
difference is what federated fine-tuning has to absorb. Each target camera gets one of
eight "looks", scaled by the shift level; the `source` cameras all use the neutral look,
which is what the base model sees.
"""

from __future__ import annotations

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
LOOKS: dict[str, dict] = {
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

_NEUTRAL = CameraStyle(camera_id="", look="neutral")


def make_camera_style(
    camera_id: str, index: int, shift: str, rng: np.random.Generator
) -> CameraStyle:
    """Camera `index` gets look `index % 8`, jittered by `rng`, scaled by the shift level."""
    strength = SHIFT_LEVELS[shift]
    if strength == 0.0:
        return CameraStyle(camera_id=camera_id, look="neutral")
    names = list(LOOKS)
    look = names[index % len(names)]
    params = LOOKS[look]

    def lerp(field: str) -> float:
        neutral = getattr(_NEUTRAL, field)
        full = params.get(field, neutral) * float(rng.uniform(0.9, 1.1))
        return neutral + strength * (full - neutral)

    cast = params.get("cast", (1.0, 1.0, 1.0))
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    bg = tuple(_muted(rng) for _ in range(3))
    return CameraStyle(
        camera_id=camera_id,
        look=look,
        gain=lerp("gain"),
        cast=tuple(1.0 + strength * (c * float(rng.uniform(0.95, 1.05)) - 1.0) for c in cast),
        haze=lerp("haze"),
        desaturate=lerp("desaturate"),
        gamma=lerp("gamma"),
        blur=lerp("blur"),
        downscale=max(1.0, lerp("downscale")),
        noise=lerp("noise"),
        jpeg_quality=round(lerp("jpeg_quality")),
        background=kind,
        bg_colours=bg,
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


def _jitter_colour(
    colour: tuple[int, int, int], rng: np.random.Generator, amount: int
) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def apply_camera(img: Image.Image, style: CameraStyle, rng: np.random.Generator) -> Image.Image:
    """Optics, resolution, light and sensor noise of `style`, with a small per-frame jitter."""
    w, h = img.size
    if style.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(style.blur))
    if style.downscale > 1.05:
        small = (max(4, round(w / style.downscale)), max(4, round(h / style.downscale)))
        img = img.resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    gain = style.gain * float(rng.uniform(0.9, 1.1))
    x = x * (gain * np.asarray(style.cast, np.float32))
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
