"""Captions for the demo CLIP's pretraining images: the digit, sometimes the style, and what the image shows.

A web caption rarely says only "seven": it says what else is in the picture. Here a caption names
the digit and, each with its own probability, the domain's style word and attributes read from
the renderer (``render(..., attrs=...)``): ink and background colours, size, position, tilt,
thickness, and a few per-domain marks (ruled paper, italic type, hatching, an outline or a
shadow). Such captions single out their image among others of the same digit, which is what lets
the contrastive loss profit from a sharp temperature (with "seven" for every seven, a batch holds
several equally right captions and the best temperature stays low).

All words here are plain English a tokenizer already knows; nothing depends on torch.
"""
from __future__ import annotations

import colorsys

import numpy as np

from .world import CLASSES, STYLE_WORDS

# (hue upper bound in degrees, name): the hue circle cut into named arcs
_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "teal"), (255, "blue"),
         (290, "purple"), (335, "pink"), (361, "red"))


def colour_name(rgb) -> str:
    """A common English name of an RGB colour (0..255): black/grey/white for the unsaturated, else a
    hue name, with "dark"/"light" for the darkest and lightest, "brown" for dark oranges, "cream" for
    pale yellows, "navy" for dark blues."""
    r, g, b = (float(v) / 255.0 for v in rgb)
    h, s, v = colorsys.rgb_to_hsv(min(max(r, 0), 1), min(max(g, 0), 1), min(max(b, 0), 1))
    if v < 0.2 or (s < 0.25 and v < 0.35):
        return "black"
    if s < 0.18:
        return "white" if v > 0.85 else "grey"
    hue = next(name for bound, name in _HUES if h * 360.0 < bound)
    if hue in ("orange", "yellow") and v < 0.55:
        return "brown"
    if hue in ("yellow", "orange") and s < 0.35 and v > 0.8:
        return "cream"
    if hue == "blue" and v < 0.5:
        return "navy"
    if v < 0.45:
        return f"dark {hue}"
    if s < 0.45 and v > 0.8:
        return f"light {hue}"
    return hue


def _where(cx: float, cy: float) -> str | None:
    """"at the top left", "on the right", ... (None when centred); cx, cy are fractions, y down."""
    v = "top" if cy < 0.42 else "bottom" if cy > 0.58 else ""
    h = "left" if cx < 0.42 else "right" if cx > 0.58 else ""
    if v and h:
        return f"at the {v} {h}"
    if v or h:
        return f"at the {v or h}"
    return None


def attribute_phrases(domain: str, attrs: dict) -> list[str]:
    """Every phrase that describes what ``render`` drew (``attrs``), in a fixed order."""
    out = []
    ink = colour_name(attrs["ink"])
    if domain == "photo":
        c0, c1 = (colour_name(c) for c in attrs["background"])
        out.append(f"in {ink}")
        out.append(f"on a {c0} background" if c0 == c1 else f"on a {c0} and {c1} background")
        if attrs["edge"] == "outline":
            out.append(f"with a {colour_name(attrs['outline'])} outline")
        elif attrs["edge"] == "shadow":
            out.append("with a shadow")
    else:
        out.append(f"in {ink} ink" if domain == "handwritten" else f"in {ink}")
        paper = colour_name(attrs["paper"])
        if domain == "handwritten" and attrs.get("ruled"):
            out.append(f"on ruled {paper} paper")
        else:
            out.append(f"on {paper} paper")
    if attrs["height"] > 0.75:
        out.append("large")
    elif attrs["height"] < 0.6:
        out.append("small")
    where = _where(attrs["cx"], attrs["cy"])
    if where:
        out.append(where)
    if attrs["rotation"] > 6:
        out.append("tilted right")
    elif attrs["rotation"] < -6:
        out.append("tilted left")
    if attrs.get("italic"):
        out.append("italic")
    if attrs["thickness"] > 0.7:
        out.append("bold" if domain in ("printed", "photo") else "thick")
    elif attrs["thickness"] < 0.3:
        out.append("thin")
    if attrs.get("hatched"):
        out.append("hatched")
    return out


def make_caption(domain: str, digit: int, attrs: dict, rng: np.random.Generator, *, style_share: float,
                 attribute_share: float, noise: float, max_phrases: int = 3, period_share: float = 0.5) -> str:
    """One caption: "[a <style> of ]a <digit>[, <attribute>]*[.]".

    With probability ``noise`` the digit named is a random one (web captions are sometimes wrong);
    a style word of ``domain`` (``world.STYLE_WORDS``) is used with probability ``style_share``;
    each attribute phrase is kept with probability ``attribute_share``, at most ``max_phrases`` of them
    (short captions keep the text tower's cost down), in a shuffled order.
    """
    if rng.random() < noise:
        digit = int(rng.integers(len(CLASSES)))
    name = CLASSES[digit]
    words = STYLE_WORDS[domain]
    if rng.random() < style_share:
        head = f"a {words[int(rng.integers(len(words)))]} of a {name}"
    else:
        head = (f"a {name}", name, f"the number {name}", f"digit {digit}")[int(rng.integers(4))]
    phrases = [p for p in attribute_phrases(domain, attrs) if rng.random() < attribute_share]
    rng.shuffle(phrases)
    phrases = phrases[:max_phrases]
    text = ", ".join([head] + phrases) if phrases else head
    return text + "." if rng.random() < period_share else text
