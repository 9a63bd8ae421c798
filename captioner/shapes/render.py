"""Rendering a scene: filled, antialiased shapes on a dark, noisy background."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from captioner.errors import CaptionerError
from captioner.shapes.world import EXTENT, GRID, SHAPES, Scene

# Fill colours, chosen to stay apart from each other and from the dark background even
# after jitter (blue is lightened so it does not sink into the background).
_RGB = {
    "red": (225, 45, 45),
    "green": (50, 200, 60),
    "blue": (60, 110, 255),
    "yellow": (240, 220, 40),
    "purple": (175, 70, 225),
    "cyan": (40, 220, 225),
    "white": (240, 240, 240),
}
_COLOUR_JITTER = 12  # +- per channel and object, so models cannot memorise exact RGB values
_BACKGROUND_LEVEL = 30.0
_BACKGROUND_NOISE = 10.0  # std of the per-pixel, per-channel Gaussian noise
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: cheap, exact antialiasing
MIN_IMAGE_SIZE = 32  # below this a small shape is only a few pixels across


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draws a scene: filled shapes on a dark background with per-pixel noise.

    Args:
        scene: what to draw.
        image_size: width and height in pixels (at least 32).
        rng: seeds the noise and the per-object colour jitter.

    Returns:
        An RGB image of ``image_size`` x ``image_size`` pixels.

    Raises:
        CaptionerError: if ``image_size`` is too small.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise CaptionerError(f"image size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = _BACKGROUND_LEVEL + _BACKGROUND_NOISE * noise_rng.standard_normal(
        (image_size, image_size, 3), dtype=np.float32
    )
    for obj in scene.objects:
        jitter = noise_rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        fill = np.clip(np.array(_RGB[obj.colour], dtype=np.float32) + jitter, 0, 255)
        # Supersample only the pixels around the shape: a fraction of the image's cost.
        radius = EXTENT[obj.size] * image_size / GRID / 2
        cx, cy = obj.x * image_size, obj.y * image_size
        x0, y0 = max(math.floor(cx - radius), 0), max(math.floor(cy - radius), 0)
        x1, y1 = min(math.ceil(cx + radius), image_size), min(math.ceil(cy + radius), image_size)
        mask = Image.new("L", ((x1 - x0) * _SUPERSAMPLE, (y1 - y0) * _SUPERSAMPLE))
        outline = _outline(obj.shape, (cx - x0) * _SUPERSAMPLE, (cy - y0) * _SUPERSAMPLE, radius * _SUPERSAMPLE)
        ImageDraw.Draw(mask).polygon(outline, fill=255)
        # A box filter averages each 4x4 block: the pixel's coverage, i.e. antialiasing.
        coverage = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        alpha = np.asarray(coverage, dtype=np.float32)[..., None] / 255
        region = pixels[y0:y1, x0:x1]
        region[...] = region * (1 - alpha) + fill * alpha
    return Image.fromarray(np.round(np.clip(pixels, 0, 255)).astype(np.uint8), "RGB")


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape fitting a 2r box around (cx, cy); circles are fine polygons."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        # Narrower than tall, so it does not read as a tilted square.
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        # A fat inner radius keeps the points visible at 10 pixels across.
        radii = itertools.cycle((r, 0.45 * r))
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii)]
    raise CaptionerError(f"unknown shape {shape!r} (valid: {', '.join(SHAPES)})")
