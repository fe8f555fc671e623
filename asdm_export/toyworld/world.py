"""A captioned synthetic world: one coloured shape on a lightly textured background, 64x64 RGB.

Image ``i`` of the world with seed ``s`` is a pure function of ``(s, i)``, so data sets are reproducible
without being stored, and any caption can be drawn on demand (``sample(..., colour=, shape=)``).
"""

from __future__ import annotations

import math

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (230, 200, 25),
    "purple": (135, 45, 175),
    "cyan": (25, 185, 200),
}
RADIUS = (13.0, 21.0)  # the shape's size range in pixels; large enough to tell a star from a circle at 16x16 latents


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def classes() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, in a fixed order."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices at ``scale * r`` from the centre: the polygons are enlarged a little so that none looks
    much smaller than the circle (areas, relative to the circle's: square 0.77, triangle 0.60, star 0.66)."""
    if shape == "square":
        corners, scale, start = [1.0] * 4, 1.1, math.pi / 4
    elif shape == "triangle":
        corners, scale, start = [1.0] * 3, 1.2, -math.pi / 2
    else:  # five-pointed star, inner radius 0.45
        corners, scale, start = [1.0, 0.45] * 5, 1.25, -math.pi / 2
    n = len(corners)
    return [(cx + r * scale * k * math.cos(angle + start + 2 * math.pi * i / n),
             cy + r * scale * k * math.sin(angle + start + 2 * math.pi * i / n)) for i, k in enumerate(corners)]


def sample(seed: int, index: int, colour: str | None = None, shape: str | None = None):
    """Image ``index`` of the world ``seed``: ``(HxWx3 uint8, colour, shape)``. Deterministic.

    ``colour`` / ``shape`` fix the class; everything else (size, place, tilt, shade, background) still
    comes from ``(seed, index)``.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    c_pick, s_pick = rng.integers(len(COLOURS)), rng.integers(len(SHAPES))
    colour = colour or list(COLOURS)[c_pick]
    shape = shape or SHAPES[s_pick]
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown class '{colour} {shape}'")
    # light background: a base grey, a faint tint and two soft random waves
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    bg = rng.uniform(225, 250) + sum(
        rng.uniform(3, 8) * np.sin(2 * math.pi * rng.uniform(0.5, 2) * (math.cos(t) * xx + math.sin(t) * yy)
                                   + rng.uniform(0, 2 * math.pi))
        for t in rng.uniform(0, math.pi, 2))
    img = np.clip(bg[..., None] + rng.uniform(-6, 6, 3), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    r = rng.uniform(*RADIUS)
    cx, cy = rng.uniform(r + 3, SIZE - r - 3, 2)  # a circle keeps 3 px off the edge; a polygon's points may cross it
    fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_outline(shape, cx, cy, r, rng.uniform(-0.35, 0.35)), fill=fill)
    return np.asarray(pil), colour, shape


def dataset(seed: int, n: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``n`` images ``(n, 64, 64, 3) uint8`` and their ``(colour, shape)`` labels."""
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = []
    for i in range(n):
        images[i], c, s = sample(seed, i)
        labels.append((c, s))
    return images, labels


def draw(seed: int, labels: list[tuple[str, str]]) -> np.ndarray:
    """Image ``i`` of world ``seed`` drawn as class ``labels[i]``: real images for a given list of classes."""
    return np.stack([sample(seed, i, c, s)[0] for i, (c, s) in enumerate(labels)])


def grid(images: np.ndarray, per_row: int) -> np.ndarray:
    """uint8 NHWC images tiled ``per_row`` to a row (the last row filled with white), to look at by eye."""
    rows = -(-len(images) // per_row)
    pad = np.full((rows * per_row - len(images), *images.shape[1:]), 255, np.uint8)
    tiles = np.concatenate([images, pad])
    return np.concatenate([np.concatenate(list(tiles[r * per_row:(r + 1) * per_row]), 1) for r in range(rows)], 0)


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1], the VAE's and the judge's input range."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
