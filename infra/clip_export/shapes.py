"""Synthetic captioned images: one coloured shape on a noisy, low-saturation background.

The demo model ``clip/tiny-shapes`` is trained on these and the tests render held-out ones, so this
module depends on numpy and Pillow only (no torch). Rendering is deterministic: the same
``(shape, color, seed, size)`` gives the same pixels, and different shapes or colours with the same
seed draw from independent random streams.

Seeds: training draws from ``[0, HELD_OUT_SEED)``; held-out evaluation uses seeds from ``HELD_OUT_SEED`` on.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")

# Base RGB per colour; each image jitters it a little so that colour words cover a region, not a point.
_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 45, 175),
}
_COLOR_JITTER = 22  # per channel, uniform in [-J, J]

TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {shape}.",
    "a {color} {shape}.",
    "a picture of a {color} {shape}",
    "a drawing of a {color} {shape}.",
    "{color} {shape}",
)

HELD_OUT_SEED = 1_000_000_000
# Shapes are drawn upright, as people draw them, give or take this much: with fully random rotations a
# model as small as clip/tiny-shapes needs several times more training to tell the shapes apart.
MAX_TILT_DEGREES = 15.0
BACKGROUND_GREY = (70.0, 200.0)  # background brightness range
RADIUS = (0.20, 0.34)  # circumradius range, as a fraction of the image side


def caption(shape: str, color: str) -> str:
    """The canonical caption, used for zero-shot labels: ``"a photo of a red circle."``."""
    return captions(shape, color)[0]


def captions(shape: str, color: str) -> tuple[str, ...]:
    """Every caption template filled in for one (shape, colour); the first is :func:`caption`."""
    _check(shape, color)
    return tuple(t.format(color=color, shape=shape) for t in TEMPLATES)


def classes() -> list[tuple[str, str]]:
    """All (shape, colour) pairs, in a fixed order (shape-major)."""
    return [(s, c) for s in SHAPES for c in COLORS]


def _check(shape: str, color: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {', '.join(COLORS)}")


def _polygon(shape: str, cx: float, cy: float, r: float, tilt: float) -> list[tuple[float, float]]:
    """Vertices of an upright regular polygon (or five-pointed star) with circumradius ``r``, turned by ``tilt``.

    Upright: the triangle and the star point up, the square sits on a side (image y grows downwards).
    """
    if shape == "square":
        radii, count, start = [r], 4, -math.pi / 4
    elif shape == "triangle":
        radii, count, start = [r], 3, -math.pi / 2
    else:  # star: alternate outer and inner radius
        radii, count, start = [r, 0.45 * r], 10, -math.pi / 2
    angles = [start + tilt + 2 * math.pi * k / count for k in range(count)]
    return [(cx + radii[k % len(radii)] * math.cos(a), cy + radii[k % len(radii)] * math.sin(a))
            for k, a in enumerate(angles)]


def render_shape(shape: str, color: str, seed: int, size: int = 224) -> Image.Image:
    """An RGB ``size`` x ``size`` image of one ``color`` ``shape``, anywhere it fits, of random size.

    Circumradius in ``RADIUS`` (fractions of ``size``), upright within ``MAX_TILT_DEGREES``, fill colour
    jittered around the colour's base RGB.
    The background is a random grey with a faint tint, a linear gradient and pixel noise, kept far
    less saturated than any shape colour so that the colour word only describes the shape.
    """
    _check(shape, color)
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = np.random.default_rng([seed, SHAPES.index(shape), COLORS.index(color)])

    grey = rng.uniform(*BACKGROUND_GREY)
    tint = rng.uniform(-12, 12, size=3)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gx, gy = rng.uniform(-20, 20, size=2)
    gradient = np.float32(gx) * ramp[None, :] + np.float32(gy) * ramp[:, None]  # (size, size)
    amplitude = int(rng.integers(4, 20))
    # Uniform integer noise: several times cheaper to draw than Gaussian noise, and looks the same.
    noise = rng.integers(-amplitude, amplitude + 1, size=(size, size, 3), dtype=np.int16)
    base = (grey + tint).astype(np.float32)
    background = noise.astype(np.float32) + (gradient[:, :, None] + base[None, None, :])
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))  # (S, S, 3) uint8: RGB

    r = rng.uniform(*RADIUS) * size  # circumradius
    cx, cy = rng.uniform(r, size - r, size=2)  # anywhere the whole shape fits
    tilt = math.radians(rng.uniform(-MAX_TILT_DEGREES, MAX_TILT_DEGREES))
    rgb = np.array(_RGB[color])
    fill = tuple(int(v) for v in np.clip(rgb + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3), 0, 255))

    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, tilt), fill=fill)
    return image
