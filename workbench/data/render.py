"""Aliasing-free rasterisation primitives for the probe scenes.

Every primitive returns boolean masks rather than drawing straight onto the
image, so the same mask both paints the pixels and defines the per-pixel
ground truth; the two can therefore never disagree.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
RGB = tuple[int, int, int]

GRID_CELLS = 3
BACKGROUND_KINDS = ("plain", "noise", "stripes")
STRIPE_PERIODS = (10, 14, 18)
STRIPE_DARKENING = 14
NOISE_AMPLITUDE = 12


def cell_span(index: int, image_size: int) -> tuple[int, int]:
    """Pixel range [start, end) of grid row/column `index` of the 3x3 layout."""
    return index * image_size // GRID_CELLS, (index + 1) * image_size // GRID_CELLS


def cell_center(row: int, col: int, image_size: int) -> tuple[int, int]:
    (x0, x1), (y0, y1) = cell_span(col, image_size), cell_span(row, image_size)
    return (x0 + x1) // 2, (y0 + y1) // 2


def _blank_canvas(image_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("1", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # binary glyphs: no antialiased edge pixels to label
    return canvas, draw


def _star_points(cx: int, cy: int, radius: float) -> list[tuple[float, float]]:
    inner = radius * 0.45
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        # Shift down slightly: a five-point star's bounding box sits high.
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle) + radius * 0.1))
    return points


def shape_mask(shape: str, center: tuple[int, int], extent: int, image_size: int) -> np.ndarray:
    """Boolean (H, W) mask of `shape` centred at `center`, about `extent` px across."""
    canvas, draw = _blank_canvas(image_size)
    cx, cy = center
    r = extent / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=1)
    elif shape == "square":
        half = round(extent * 0.43)  # a full-extent square looks much bigger than a circle
        draw.rectangle([cx - half, cy - half, cx + half - 1, cy + half - 1], fill=1)
    elif shape == "triangle":
        draw.polygon([(cx, cy - 0.9 * r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=1)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r), fill=1)
    elif shape == "cross":
        arm = round(extent * 0.18)
        draw.rectangle([cx - arm, cy - r, cx + arm - 1, cy + r - 1], fill=1)
        draw.rectangle([cx - r, cy - arm, cx + r - 1, cy + arm - 1], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.array(canvas, dtype=bool)


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font, so rendering never depends on system fonts."""
    return ImageFont.load_default(size=size)


def text_boldness(font_size: int) -> int:
    """Extra px each glyph is smeared to the right: thin strokes break up at 224 px.

    Smearing only horizontally thickens vertical strokes without closing the
    horizontal gaps that tell glyphs apart (a stroked "5" reads as "6").
    """
    return max(1, font_size // 16)


def _char_offsets(string: str, font_size: int) -> list[int]:
    # Extra spacing keeps neighbouring emboldened glyphs from touching.
    face, spacing = font(font_size), text_boldness(font_size) + 1
    return [round(face.getlength(string[:index])) + index * spacing for index in range(len(string))]


def text_ink_box(string: str, font_size: int) -> Box:
    """Ink bounding box of `string` relative to its drawing origin."""
    face, bold = font(font_size), text_boldness(font_size)
    boxes = [face.getbbox(char) for char in string]
    offsets = _char_offsets(string, font_size)
    return (min(x + box[0] for x, box in zip(offsets, boxes)), min(box[1] for box in boxes),
            max(x + box[2] + bold for x, box in zip(offsets, boxes)), max(box[3] for box in boxes))


def fit_font_size(string: str, max_width: int, max_height: int) -> int:
    """Largest font size whose rendering of `string` fits in max_width x max_height."""
    size = max_height
    while size > 6:
        left, top, right, bottom = text_ink_box(string, size)
        if right - left <= max_width and bottom - top <= max_height:
            return size
        size -= 1
    return size


def centred_text_origin(string: str, font_size: int, center: tuple[int, int]) -> tuple[int, int]:
    """Drawing origin that puts the ink bounding box of `string` at `center`."""
    left, top, right, bottom = text_ink_box(string, font_size)
    return center[0] - (left + right) // 2, center[1] - (top + bottom) // 2


def glyph_masks(string: str, origin: tuple[int, int], font_size: int, image_size: int) -> list[np.ndarray]:
    """One boolean mask per character of `string` drawn at `origin`."""
    face, bold = font(font_size), text_boldness(font_size)
    masks = []
    for char, offset in zip(string, _char_offsets(string, font_size)):
        canvas, draw = _blank_canvas(image_size)
        for smear in range(bold + 1):
            draw.text((origin[0] + offset + smear, origin[1]), char, font=face, fill=1)
        masks.append(np.array(canvas, dtype=bool))
    return masks


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` px (chessboard distance) of a True pixel of `mask`."""
    grown = mask
    for axis in (0, 1):  # a square neighbourhood is separable into two 1-D passes
        pad = [(radius, radius) if a == axis else (0, 0) for a in (0, 1)]
        padded = np.pad(grown, pad)
        length = mask.shape[axis]
        grown = np.logical_or.reduce([np.take(padded, range(k, k + length), axis=axis)
                                      for k in range(2 * radius + 1)])
    return grown


def mask_box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def background_pixels(kind: str, colour: RGB, texture_seed: int, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 background; textures are subtle so shapes stay salient."""
    base = np.broadcast_to(np.array(colour, dtype=np.int16), (image_size, image_size, 3))
    rng = np.random.default_rng(texture_seed)
    if kind == "plain":
        shade = np.zeros((image_size, image_size), dtype=np.int16)
    elif kind == "noise":
        shade = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, (image_size, image_size), dtype=np.int16)
    elif kind == "stripes":
        period = int(rng.choice(STRIPE_PERIODS))
        ys, xs = np.mgrid[0:image_size, 0:image_size]
        phase = [xs, ys, xs + ys][int(rng.integers(3))]  # vertical, horizontal or diagonal
        shade = np.where(phase % period < period // 2, -STRIPE_DARKENING, 0).astype(np.int16)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.clip(base + shade[..., None], 0, 255).astype(np.uint8)
