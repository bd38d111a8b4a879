"""The demo world's renderers: one digit image in the style of one domain, from a numpy generator.

Domains
-------
``handwritten``
    scikit-learn's 8x8 handwritten digits, smoothly upscaled, in ballpoint/pencil ink on cream
    paper (sometimes ruled), with rotation, slant, thickness and placement jitter.
``printed``
    the digit typeset with Pillow's bundled font, crisp and dark on white, with varying size,
    weight (stroke width), position, slight rotation and occasional italic slant.
``sketch``
    a wobbly double-traced pencil outline of a bold glyph on grey-white drawing paper,
    sometimes hatched inside, with stray construction lines.
``photo``
    a filled, saturated digit (often with a contrasting rim or shadow) on a blurred, cluttered,
    colourful background of gradients and shapes, under uneven lighting, colour cast and noise.

Only Pillow's bundled font is used (never system fonts), so for a given generator state the output
is identical on every machine with the same Pillow version. What every domain shares (glyphs,
placement, masks, noise, compositing, downsampling) is in ``canvas.py``. This module imports neither
torch nor torchvision nor open_clip.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .canvas import (
    SUPERSAMPLE,
    composite,
    dilate,
    erode,
    finish,
    glyph,
    hsv,
    luma,
    place,
    record_ink,
    smooth_noise,
    smoothstep,
)

DOMAINS: tuple[str, ...] = ("handwritten", "printed", "sketch", "photo")
SPLITS: tuple[str, ...] = ("benchmark", "pretrain")


# --------------------------------------------------------------------------------------------
# domains
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_pool() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def _handwritten_indices(digit: int, split: str | None) -> np.ndarray:
    _, target = _digits_pool()
    idx = np.flatnonzero(target == digit)
    # Disjoint halves of the 8x8 scans: the benchmark uses even positions, pretraining odd,
    # so the demo CLIP never sees a benchmark image's underlying handwriting.
    if split == "benchmark":
        idx = idx[0::2]
    elif split == "pretrain":
        idx = idx[1::2]
    return idx


def _render_handwritten(digit: int, rng: np.random.Generator, size: int, split: str | None, attrs: dict):
    C = size * SUPERSAMPLE
    images, _ = _digits_pool()
    idx = _handwritten_indices(digit, split)
    scan = np.pad(images[rng.choice(idx)], 1)  # 10x10, zero border
    src = Image.fromarray((scan * 255).astype(np.uint8)).resize((40, 40), Image.Resampling.BICUBIC)
    src = src.filter(ImageFilter.GaussianBlur(1.2))
    m = place(
        src, C, rng,
        height=rng.uniform(0.95, 1.2) * C,  # the 8x8 scans carry ~1/10 blank border per side
        rotation=rng.uniform(-14, 14), shear=rng.uniform(-0.3, 0.2),
        aspect=rng.uniform(0.75, 1.1), margin=0.0, attrs=attrs,
    )
    # Threshold the soft upscaled scan into a stroke; the threshold sets the pen thickness.
    t = rng.uniform(0.36, 0.56)
    ink_a = smoothstep(m, t - 0.12, t + 0.12)
    # Paper: cream, mottled, sometimes ruled like a notebook.
    paper = np.array([rng.uniform(236, 252), rng.uniform(226, 242), rng.uniform(188, 218)],
                     dtype=np.float32)
    bg = np.broadcast_to(paper, (C, C, 3)).copy()
    bg += (smooth_noise(rng, C, 5)[..., None] - 0.5) * rng.uniform(8, 20)
    ruled = rng.random() < 0.5
    if ruled:
        gap = rng.uniform(0.22, 0.32) * C
        off = rng.uniform(0, gap)
        ys = np.arange(C, dtype=np.float32)
        d = np.abs(((ys - off) % gap) - gap / 2.0) - gap / 2.0 + 2.5
        line = np.clip(d / 2.5, 0, 1)[:, None] * np.ones((1, C), dtype=np.float32)
        bg = composite(bg, (120, 160, 215), line * rng.uniform(0.35, 0.7))
    # Ink: blue/black ballpoint or graphite, with uneven pressure.
    kind = rng.random()
    if kind < 0.45:
        ink = (rng.uniform(15, 45), rng.uniform(25, 65), rng.uniform(105, 170))  # blue pen
    elif kind < 0.8:
        g = rng.uniform(25, 70)
        ink = (g, g, g * rng.uniform(0.95, 1.1))  # black pen / graphite
    else:
        ink = (rng.uniform(20, 50), rng.uniform(20, 40), rng.uniform(60, 95))  # dark violet
    pressure = 0.7 + 0.3 * smooth_noise(rng, C, 4)
    record_ink(attrs, ink_a, ink)
    attrs.update(thickness=float((0.56 - t) / 0.2), paper=tuple(float(v) for v in paper), ruled=bool(ruled))
    arr = composite(bg, ink, ink_a * pressure * rng.uniform(0.85, 1.0))
    return finish(arr, size, rng, noise=rng.uniform(1.0, 3.0))


def _render_printed(digit: int, rng: np.random.Generator, size: int, attrs: dict):
    C = size * SUPERSAMPLE
    stroke = int(rng.integers(0, 5))
    italic = rng.random() < 0.2
    m = place(
        glyph(digit, stroke), C, rng,
        height=rng.uniform(0.5, 0.85) * C, rotation=rng.uniform(-7, 7),
        shear=(-rng.uniform(0.15, 0.3) if italic else rng.uniform(-0.05, 0.05)),
        aspect=rng.uniform(0.8, 1.25), margin=0.05, attrs=attrs,
    )
    white = rng.uniform(247, 255)
    bg = np.full((C, C, 3), white, dtype=np.float32)
    kind = rng.random()
    if kind < 0.6:
        g = rng.uniform(0, 45)
        ink = (g, g, g)
    elif kind < 0.75:
        ink = (rng.uniform(0, 30), rng.uniform(10, 40), rng.uniform(60, 110))  # navy
    elif kind < 0.9:
        ink = (rng.uniform(90, 140), rng.uniform(0, 25), rng.uniform(0, 30))  # dark red
    else:
        ink = (rng.uniform(0, 25), rng.uniform(50, 80), rng.uniform(20, 45))  # dark green
    record_ink(attrs, m, ink)
    attrs.update(thickness=stroke / 4.0, italic=bool(italic), paper=(white, white, white))
    arr = composite(bg, ink, m)
    return finish(arr, size, rng, noise=rng.uniform(0.0, 1.0))


def _warp(mask: np.ndarray, rng: np.random.Generator, amp: float) -> np.ndarray:
    """Displace a mask by a smooth random field (hand wobble), nearest-neighbour."""
    C = mask.shape[0]
    dx = (smooth_noise(rng, C, 5) - 0.5) * 2 * amp
    dy = (smooth_noise(rng, C, 5) - 0.5) * 2 * amp
    yy, xx = np.mgrid[0:C, 0:C]
    sx = np.clip(np.rint(xx + dx), 0, C - 1).astype(np.intp)
    sy = np.clip(np.rint(yy + dy), 0, C - 1).astype(np.intp)
    return mask[sy, sx]


def _hatch(C: int, rng: np.random.Generator, spacing: float, width: float) -> np.ndarray:
    ang = rng.choice([rng.uniform(30, 60), rng.uniform(120, 150)])
    th = np.deg2rad(ang)
    yy, xx = np.mgrid[0:C, 0:C].astype(np.float32)
    u = xx * np.cos(th) + yy * np.sin(th) + rng.uniform(0, spacing)
    d = np.abs((u % spacing) - spacing / 2.0)
    return np.clip((d - (spacing / 2.0 - width)) / 1.5, 0, 1)


def _render_sketch(digit: int, rng: np.random.Generator, size: int, attrs: dict):
    C = size * SUPERSAMPLE
    stroke = int(rng.integers(2, 7))
    m = place(
        glyph(digit, stroke), C, rng,
        height=rng.uniform(0.6, 0.85) * C, rotation=rng.uniform(-10, 10),
        shear=rng.uniform(-0.15, 0.15), aspect=rng.uniform(0.85, 1.25), margin=0.07, attrs=attrs,
    )
    solid = (m > 0.5).astype(np.float32)
    k = int(rng.choice([3, 5]))
    outline = np.clip(dilate(solid, k) - erode(solid, 3), 0, 1)
    # Two wobbly passes of the pencil, like a quick sketch.
    lines = _warp(outline, rng, amp=rng.uniform(1.5, 3.5))
    lines = np.maximum(lines, _warp(outline, rng, amp=rng.uniform(2.0, 4.5)) * rng.uniform(0.4, 0.8))
    # Paper: grey-white drawing paper with a soft smudge.
    p = rng.uniform(222, 240)
    bg = np.broadcast_to(np.array([p, p, p + rng.uniform(-2, 5)], dtype=np.float32), (C, C, 3)).copy()
    bg -= smooth_noise(rng, C, 3)[..., None] * rng.uniform(4, 14)
    alpha = lines * rng.uniform(0.8, 1.0)
    hatched = rng.random() < 0.6
    if hatched:  # hatching inside the glyph
        inside = _warp(erode(solid, 5), rng, amp=2.0)
        alpha = np.maximum(alpha, _hatch(C, rng, rng.uniform(9, 13), 1.6) * inside * rng.uniform(0.35, 0.6))
    strays = int(rng.integers(0, 3))
    for _ in range(strays):  # faint stray construction lines
        stray = Image.new("L", (C, C), 0)
        x0, y0, x1, y1 = rng.uniform(0, C, 4)
        ImageDraw.Draw(stray).line([(x0, y0), (x1, y1)], fill=255, width=2)
        alpha = np.maximum(alpha, np.asarray(stray, dtype=np.float32) / 255.0 * rng.uniform(0.15, 0.35))
    g = rng.uniform(35, 80)
    ink = (g, g, g * rng.uniform(1.0, 1.12))
    record_ink(attrs, solid, ink)
    attrs.update(thickness=(stroke - 2) / 4.0, paper=(p, p, p), hatched=bool(hatched), strays=strays)
    arr = composite(bg, ink, alpha)
    return finish(arr, size, rng, noise=rng.uniform(1.0, 2.5))


def _photo_background(C: int, rng: np.random.Generator, attrs: dict) -> np.ndarray:
    h0 = rng.random()
    c0 = hsv(h0, rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.95))
    c1 = hsv(h0 + rng.uniform(0.15, 0.6), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.95))
    attrs["background"] = (tuple(float(v) for v in c0), tuple(float(v) for v in c1))
    th = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:C, 0:C].astype(np.float32) / C
    t = np.clip((xx - 0.5) * np.cos(th) + (yy - 0.5) * np.sin(th) + 0.5, 0, 1)[..., None]
    bg = c0 * (1 - t) + c1 * t
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), mode="RGB").convert("RGBA")
    layer = Image.new("RGBA", (C, C), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(5, 12))):  # clutter
        col = tuple(int(v) for v in hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0)))
        fill = col + (int(rng.uniform(90, 230)),)
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * C
        w, h = rng.uniform(0.15, 0.6, 2) * C
        shape = rng.random()
        if shape < 0.4:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif shape < 0.75:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            pts = [tuple(p) for p in rng.uniform(-0.1, 1.1, (3, 2)) * C]
            draw.polygon(pts, fill=fill)
    im = Image.alpha_composite(im, layer).convert("RGB")
    blur = rng.uniform(1.5, 5.0)
    attrs["blur"] = float(blur)
    im = im.filter(ImageFilter.GaussianBlur(blur))  # shallow depth of field
    arr = np.asarray(im, dtype=np.float32)
    arr += (smooth_noise(rng, C, 16)[..., None] - 0.5) * rng.uniform(10, 35)  # texture
    return arr


def _render_photo(digit: int, rng: np.random.Generator, size: int, attrs: dict):
    C = size * SUPERSAMPLE
    bg = _photo_background(C, rng, attrs)
    stroke = int(rng.integers(2, 8))
    m = place(
        glyph(digit, stroke), C, rng,
        height=rng.uniform(0.6, 0.88) * C, rotation=rng.uniform(-15, 15),
        shear=rng.uniform(-0.2, 0.2), aspect=rng.uniform(0.85, 1.3), margin=0.04, attrs=attrs,
    )
    # A saturated fill that contrasts in brightness with what lies behind the digit.
    under = float(luma((bg * m[..., None]).sum((0, 1)) / max(m.sum(), 1.0)))
    bright = under < 128
    best, best_c = None, -1.0
    for _ in range(16):
        v = rng.uniform(0.8, 1.0) if bright else rng.uniform(0.1, 0.45)
        cand = hsv(rng.random(), rng.uniform(0.5, 1.0), v)
        contrast = abs(float(luma(cand)) - under)
        if contrast > best_c:
            best, best_c = cand, contrast
        if contrast >= 75:
            break
    assert best is not None  # (the first candidate beats -1)
    fill = best
    # Slight shading across the digit (a painted/plastic object, not flat ink).
    shade = 0.8 + 0.35 * smooth_noise(rng, C, 3)[..., None]
    rim = 0.0 if best_c < 90 else rng.random()  # weak contrast: always outline the digit
    record_ink(attrs, m, fill)
    attrs.update(thickness=(stroke - 2) / 5.0, edge="outline" if rim < 0.45 else "shadow" if rim < 0.8 else "none",
                 outline=(20, 20, 20) if bright else (240, 240, 240))
    if rim < 0.45:  # contrasting rim
        rim_a = dilate(m, int(rng.choice([5, 7, 9])))
        rim_col = (20, 20, 20) if bright else (240, 240, 240)
        bg = composite(bg, rim_col, rim_a)
    elif rim < 0.8:  # drop shadow
        dx, dy = rng.integers(3, 9, 2) * rng.choice([-1, 1], 2)
        sh = np.roll(np.roll(m, int(dy), axis=0), int(dx), axis=1)
        sh = np.asarray(Image.fromarray((sh * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)),
                        dtype=np.float32) / 255.0
        bg = composite(bg, (0, 0, 0), sh * rng.uniform(0.5, 0.8))
    arr = composite(bg, fill * shade, m)
    # Lighting: directional gradient, a soft spotlight / vignette, exposure and colour cast.
    yy, xx = np.mgrid[0:C, 0:C].astype(np.float32) / C
    th = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.0, 0.45) * ((xx - 0.5) * np.cos(th) + (yy - 0.5) * np.sin(th))
    sx, sy = rng.uniform(0.2, 0.8, 2)
    r2 = (xx - sx) ** 2 + (yy - sy) ** 2
    light *= 1.0 + rng.uniform(-0.25, 0.35) * np.exp(-r2 / rng.uniform(0.05, 0.3))
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    arr = arr * light[..., None] * gain
    gamma = rng.uniform(0.8, 1.25)
    arr = 255.0 * (np.clip(arr, 0, 255) / 255.0) ** gamma
    return finish(arr, size, rng, noise=rng.uniform(2.0, 7.0))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def render(domain: str, digit: int, rng: np.random.Generator, size: int = 32, *, split: str | None = None,
           attrs: dict | None = None) -> Image.Image:
    """Draw one ``size`` x ``size`` RGB image of ``digit`` (0-9) in the style of ``domain``.

    All randomness comes from ``rng``. ``split`` ("benchmark", "pretrain" or None for all)
    only matters for ``handwritten``: it selects a disjoint half of scikit-learn's scans, so
    that pretraining images never reuse a benchmark image's handwriting.

    ``attrs``: a dict that receives what was drawn (for captions that describe their image; the
    drawing and the generator's draws are the same with or without it): ``height``, ``width``,
    ``cx``, ``cy`` (ink bounding box and centroid, fractions of the image, y down), ``rotation``
    (degrees) and ``shear``, ``thickness`` (0 thinnest .. 1 boldest of the domain), ``ink`` (RGB
    0..255), then per domain ``paper`` (RGB), ``ruled``, ``italic``, ``hatched``, ``strays``,
    ``background`` (the photo's two gradient colours), ``blur``, ``edge`` ("outline", "shadow",
    "none") and ``outline`` (its colour).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    digit = int(digit)
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if int(size) < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    size = int(size)
    attrs = {} if attrs is None else attrs
    if domain == "handwritten":
        return _render_handwritten(digit, rng, size, split, attrs)
    if domain == "printed":
        return _render_printed(digit, rng, size, attrs)
    if domain == "sketch":
        return _render_sketch(digit, rng, size, attrs)
    return _render_photo(digit, rng, size, attrs)
