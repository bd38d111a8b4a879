"""The demo renderers' shared drawing: a digit's glyph in Pillow's bundled font, a mask warped into
place on the supersampled canvas, masks, noise and colours, compositing, and the final downsampling
with grain. This module imports neither torch nor torchvision nor open_clip.
"""

from __future__ import annotations

import colorsys
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUPERSAMPLE = 4  # draw at size*4, then box-downsample: smooth anti-aliased strokes
GLYPH_PX = 96  # font size at which glyphs are rasterised before being warped into place


@functools.lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=px)
    if not isinstance(font, ImageFont.FreeTypeFont):  # pragma: no cover - depends on the build
        raise RuntimeError(
            "the demo world needs Pillow built with FreeType (ImageFont.load_default(size=...) "
            f"returned a {type(font).__name__}); install a standard Pillow wheel (>= 10.1)"
        )
    return font


@functools.lru_cache(maxsize=None)
def glyph(digit: int, stroke: int) -> Image.Image:
    """The digit in Pillow's bundled font, white on black ("L"), cropped to its ink."""
    font = _font(GLYPH_PX)
    text = str(digit)
    pad = 4 + stroke
    im = Image.new("L", (GLYPH_PX + 2 * pad, GLYPH_PX + 2 * pad), 0)
    ImageDraw.Draw(im).text(
        (pad, pad - GLYPH_PX // 4), text, fill=255, font=font,
        stroke_width=stroke, stroke_fill=255,
    )
    bbox = im.getbbox()
    assert bbox is not None
    return im.crop(bbox)


def place(
    src: Image.Image,
    canvas: int,
    rng: np.random.Generator,
    *,
    height: float,
    rotation: float,
    shear: float = 0.0,
    aspect: float = 1.0,
    margin: float = 0.06,
    attrs: dict | None = None,
) -> np.ndarray:
    """Warp an "L" mask into a canvas x canvas float array in [0, 1].

    The source is scaled to ``height`` pixels tall (times ``aspect`` in width), sheared,
    rotated by ``rotation`` degrees and put at a random position that keeps it inside the
    canvas (shrunk if it would not fit). ``attrs`` (a dict) receives the rotation and shear.
    """
    w, h = src.size
    s = height / h
    th = np.deg2rad(rotation)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    a = s * rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0])
    corners = np.array([[-w, -h], [w, -h], [-w, h], [w, h]], dtype=np.float64) / 2.0
    ext = np.abs(corners @ a.T).max(axis=0)  # half extents (x, y) in output pixels
    room = canvas / 2.0 - margin * canvas
    fit = min(1.0, room / ext.max())
    a *= fit
    ext *= fit
    lo = margin * canvas + ext
    hi = canvas - margin * canvas - ext
    cx, cy = rng.uniform(lo, np.maximum(lo, hi) + 1e-9)
    inv = np.linalg.inv(a)
    c = np.array([w / 2.0, h / 2.0]) - inv @ np.array([cx, cy])
    data = (inv[0, 0], inv[0, 1], c[0], inv[1, 0], inv[1, 1], c[1])
    out = src.transform((canvas, canvas), Image.Transform.AFFINE, data, Image.Resampling.BICUBIC)
    if attrs is not None:
        attrs.update(rotation=float(rotation), shear=float(shear))
    return np.asarray(out, dtype=np.float32) / 255.0


def record_ink(attrs: dict, mask: np.ndarray, ink) -> None:
    """Where the ink of ``mask`` lies (fractions of the canvas: bounding box size, centroid) and its colour."""
    C = mask.shape[0]
    ys, xs = np.nonzero(mask > 0.5)
    ys, xs = (ys, xs) if len(ys) else (np.array([C // 2]), np.array([C // 2]))
    attrs.update(
        height=float(ys.max() - ys.min() + 1) / C,
        width=float(xs.max() - xs.min() + 1) / C,
        cx=float(xs.mean()) / C,
        cy=float(ys.mean()) / C,
        ink=tuple(float(v) for v in np.asarray(ink, dtype=np.float32).reshape(-1, 3).mean(0)),
    )


def smooth_noise(rng: np.random.Generator, canvas: int, cells: int) -> np.ndarray:
    """Low-frequency noise in roughly [0, 1]: a cells x cells grid bicubically upsampled."""
    grid = rng.random((cells, cells), dtype=np.float32)
    im = Image.fromarray(grid, mode="F").resize((canvas, canvas), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def dilate(mask: np.ndarray, k: int) -> np.ndarray:
    im = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.MaxFilter(k)), dtype=np.float32) / 255.0


def erode(mask: np.ndarray, k: int) -> np.ndarray:
    im = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.MinFilter(k)), dtype=np.float32) / 255.0


def composite(bg: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """Paint ``colour`` (RGB 0..255, or an HxWx3 array) over ``bg`` with coverage ``alpha``."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    return bg * (1.0 - a) + np.asarray(colour, dtype=np.float32) * a


def finish(arr: np.ndarray, size: int, rng: np.random.Generator, noise: float) -> Image.Image:
    """Box-downsample the supersampled canvas to size x size, add pixel grain, quantise."""
    im = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="RGB")
    small = np.asarray(im.reduce(SUPERSAMPLE), dtype=np.float32)
    if noise > 0:
        small = small + rng.normal(0.0, noise, small.shape).astype(np.float32)
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8), mode="RGB")


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def luma(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
