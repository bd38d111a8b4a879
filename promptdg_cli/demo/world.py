"""The offline "demo world": a tiny multi-domain digits benchmark generated on the spot.

A new user has no CLIP weights and no datasets. This module draws a PACS-like benchmark in
miniature -- 4 visually distinct domains x 10 digit classes -- from nothing but numpy, Pillow
(and its bundled font) and scikit-learn's bundled ``load_digits`` images, so that a tiny CLIP
can be pretrained and every domain generalization method can run end to end on a laptop CPU.

The images are drawn by ``renderers.py`` with ``canvas.py``'s shared drawing (one module per
concern: each domain's style there, glyphs, placement and compositing in ``canvas.py``, the
benchmark's layout, seeding and caching here); see its docstring for what each domain looks like.

Public API
----------
``DOMAINS``, ``CLASSES``, ``STYLE_WORDS``, ``render``, ``generate_dataset``, ``sample_images``.

This module deliberately imports neither torch nor torchvision nor open_clip.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from .renderers import DOMAINS, render

__all__ = [
    "CLASSES",
    "DOMAINS",
    "GENERATOR_VERSION",
    "STYLE_WORDS",
    "generate_dataset",
    "render",
    "sample_images",
]

#: Bump whenever the rendering changes, so that cached datasets on disk are regenerated.
GENERATOR_VERSION = 1

CLASSES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

#: Phrases a caption may use for each domain's style ("a sketch of the number seven").
STYLE_WORDS: dict[str, list[str]] = {
    "handwritten": ["handwritten", "hand-written", "handwriting", "scribbled", "hand-drawn"],
    "printed": ["printed", "typeset", "typed", "print", "font"],
    "sketch": ["sketch", "outline drawing", "line drawing", "pencil sketch", "doodle"],
    "photo": ["photo", "photograph", "picture", "snapshot", "photo of a sign"],
}

MARKER_NAME = ".complete"

# Purposes are mixed into the seed derivation, so even with an equal seed the pretraining
# stream (sample_images) never repeats a benchmark image (generate_dataset).
_PURPOSE_BENCHMARK = 0
_PURPOSE_PRETRAIN = 1


def _rng_for(seed: int, purpose: int, domain: str, digit: int) -> np.random.Generator:
    """One independent generator per (purpose, domain, class): order of generation is moot."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(purpose, DOMAINS.index(domain), digit))
    return np.random.Generator(np.random.PCG64(ss))


def sample_images(seed: int, per_class: int, size: int = 32) -> Iterator[tuple[str, int, Image.Image]]:
    """Yield ``(domain, digit, image)`` for every domain, digit and ``per_class`` index.

    Uses the same renderers as :func:`generate_dataset`, for pretraining the demo CLIP; nothing
    is written to disk. Pass a different seed than the benchmark's: in addition, the seed is
    mixed with a "pretrain" tag (and handwritten images come from the other half of the scans),
    so even an equal seed would not reproduce benchmark images.
    """
    if int(per_class) < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    for domain in DOMAINS:
        for digit in range(len(CLASSES)):
            rng = _rng_for(seed, _PURPOSE_PRETRAIN, domain, digit)
            for _ in range(int(per_class)):
                yield domain, digit, render(domain, digit, rng, size, split="pretrain")


def _marker_payload(seed: int, per_class: int, size: int) -> dict:
    return {
        "generator": "promptdg-demo-world",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "per_class": int(per_class),
        "size": int(size),
        "domains": list(DOMAINS),
        "classes": list(CLASSES),
    }


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _same_args(found: dict | None, wanted: dict) -> bool:
    return found is not None and all(found.get(k) == v for k, v in wanted.items())


def generate_dataset(out_dir, seed: int = 0, per_class: int = 60, size: int = 32) -> Path:
    """Write the demo benchmark to ``<out_dir>/<domain>/<class>/<domain>_<class>_<i:04d>.png``.

    Deterministic: every (domain, class) has its own generator derived from ``seed`` with
    :class:`numpy.random.SeedSequence`, so the bytes do not depend on generation order.

    Atomic: the images are written into a temporary sibling directory which is then renamed to
    ``out_dir``; ``out_dir/.complete`` (JSON: generator version and arguments) is written last
    inside it, so ``out_dir`` either does not exist or is complete.

    Caching: if ``out_dir/.complete`` already records the same version and arguments, nothing
    is done. If it records different ones (other seed/per_class/size or an older generator
    version), the directory is regenerated and replaced as a whole (atomically). A directory
    that exists, is non-empty and has no ``.complete`` marker is not ours: ``FileExistsError``
    is raised rather than deleting it.

    Returns ``out_dir`` as a :class:`pathlib.Path`.
    """
    if int(per_class) < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if int(size) < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    out_dir = Path(out_dir)
    wanted = _marker_payload(seed, per_class, size)
    marker = out_dir / MARKER_NAME
    if _same_args(_read_marker(marker), wanted):
        return out_dir
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if not marker.exists() and any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} is a non-empty directory without a {MARKER_NAME} marker; refusing to "
                "overwrite it with the demo world (choose another directory or empty it)"
            )

    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the dataset is meant to be shared
        for domain in DOMAINS:
            for digit, cls in enumerate(CLASSES):
                rng = _rng_for(seed, _PURPOSE_BENCHMARK, domain, digit)
                d = tmp / domain / cls
                d.mkdir(parents=True)
                for i in range(int(per_class)):
                    img = render(domain, digit, rng, int(size), split="benchmark")
                    img.save(d / f"{domain}_{cls}_{i:04d}.png", format="PNG")
        payload = dict(wanted, pillow=PIL.__version__)
        (tmp / MARKER_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        _install(tmp, out_dir, wanted)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _install(tmp: Path, out_dir: Path, wanted: dict) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing a stale/empty ``out_dir`` if there is one."""
    old = None
    if out_dir.exists():
        if _same_args(_read_marker(out_dir / MARKER_NAME), wanted):  # a concurrent run won
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if _same_args(_read_marker(out_dir / MARKER_NAME), wanted):  # lost a race, same result
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
