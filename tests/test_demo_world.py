"""Tests for the offline demo world (promptdg_cli.demo.world)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptdg_cli.demo import canvas, renderers, world

PER_CLASS = 6
SIZE = 32


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _pixels(path: Path, side: int = 8, gray: bool = False) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("L" if gray else "RGB")
        return np.asarray(im.resize((side, side), Image.Resampling.BOX), dtype=np.float32).ravel() / 255.0


def _nearest_centroid_accuracy(xtr, ytr, xte, yte) -> float:
    labels = np.unique(ytr)
    cent = np.stack([xtr[ytr == c].mean(0) for c in labels])
    pred = labels[((xte[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == yte).mean())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "demo"
    return world.generate_dataset(out, seed=0, per_class=PER_CLASS, size=SIZE)


def test_constants():
    assert world.DOMAINS == ("handwritten", "printed", "sketch", "photo")
    assert world.CLASSES == (
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    )
    assert set(world.STYLE_WORDS) == set(world.DOMAINS)
    for words in world.STYLE_WORDS.values():
        assert words and all(isinstance(w, str) and w for w in words)
    assert "sketch" in world.STYLE_WORDS["sketch"] and "photo" in world.STYLE_WORDS["photo"]


@pytest.mark.parametrize("module", [world, renderers, canvas])
def test_world_does_not_import_torch(module):
    src = Path(module.__file__).read_text()
    for mod in ("torch", "torchvision", "open_clip"):
        assert f"import {mod}" not in src and f"from {mod}" not in src


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_render_returns_rgb_image_of_requested_size(domain):
    rng = np.random.default_rng(0)
    for size in (32, 24):
        img = world.render(domain, 7, rng, size=size)
        assert img.mode == "RGB" and img.size == (size, size)
        arr = np.asarray(img, dtype=np.float32)
        assert arr.std() > 10, "image is (almost) blank"


def test_render_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        world.render("cartoon", 1, rng)
    with pytest.raises(ValueError):
        world.render("printed", 10, rng)


def test_layout(dataset):
    assert dataset.is_dir()
    assert sorted(p.name for p in dataset.iterdir() if p.is_dir()) == sorted(world.DOMAINS)
    for domain in world.DOMAINS:
        classes = sorted(p.name for p in (dataset / domain).iterdir())
        assert classes == sorted(world.CLASSES)
        for cls in world.CLASSES:
            files = sorted((dataset / domain / cls).iterdir())
            assert [f.name for f in files] == [f"{domain}_{cls}_{i:04d}.png" for i in range(PER_CLASS)]
            for f in files:
                with Image.open(f) as im:
                    assert im.format == "PNG"
                    assert im.size == (SIZE, SIZE)
                    assert im.mode == "RGB"
    marker = json.loads((dataset / ".complete").read_text())
    assert marker["version"] == world.GENERATOR_VERSION
    assert (marker["seed"], marker["per_class"], marker["size"]) == (0, PER_CLASS, SIZE)
    # No temporary or stale siblings are left behind.
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset, tmp_path):
    again = world.generate_dataset(tmp_path / "again", seed=0, per_class=PER_CLASS, size=SIZE)
    other = world.generate_dataset(tmp_path / "other", seed=1, per_class=PER_CLASS, size=SIZE)
    rel = [p.relative_to(dataset) for p in _files(dataset) if p.suffix == ".png"]
    assert len(rel) == len(world.DOMAINS) * len(world.CLASSES) * PER_CLASS
    assert [p.relative_to(again) for p in _files(again) if p.suffix == ".png"] == rel
    for r in rel:
        assert (dataset / r).read_bytes() == (again / r).read_bytes(), r
    n_diff = sum((dataset / r).read_bytes() != (other / r).read_bytes() for r in rel)
    assert n_diff == len(rel), f"only {n_diff}/{len(rel)} images differ across seeds"


def test_per_class_streams_do_not_depend_on_per_class(dataset, tmp_path):
    # One generator per (domain, class): more images per class extends, never reshuffles.
    more = world.generate_dataset(tmp_path / "more", seed=0, per_class=PER_CLASS + 2, size=SIZE)
    for domain in world.DOMAINS:
        cls = world.CLASSES[3]
        for i in range(PER_CLASS):
            name = f"{domain}/{cls}/{domain}_{cls}_{i:04d}.png"
            assert (dataset / name).read_bytes() == (more / name).read_bytes()


def test_cached_call_does_not_rewrite(tmp_path, monkeypatch):
    out = tmp_path / "w"
    world.generate_dataset(out, seed=3, per_class=2, size=SIZE)
    files = _files(out)
    old = time.time() - 3600  # push mtimes into the past so a rewrite is detectable
    for p in files:
        os.utime(p, (old, old))
    before = {p: p.stat().st_mtime_ns for p in files}

    def no_render(*a, **k):
        raise AssertionError("a cached dataset must not be rendered again")

    monkeypatch.setattr(world, "render", no_render)
    assert world.generate_dataset(str(out), seed=3, per_class=2, size=SIZE) == out
    assert {p: p.stat().st_mtime_ns for p in _files(out)} == before


def test_different_args_regenerate(tmp_path):
    out = tmp_path / "w"
    world.generate_dataset(out, seed=3, per_class=2, size=SIZE)
    first = (out / "photo" / "five" / "photo_five_0000.png").read_bytes()
    world.generate_dataset(out, seed=4, per_class=3, size=SIZE)
    marker = json.loads((out / ".complete").read_text())
    assert (marker["seed"], marker["per_class"]) == (4, 3)
    assert len(list((out / "photo" / "five").iterdir())) == 3
    assert (out / "photo" / "five" / "photo_five_0000.png").read_bytes() != first
    world.generate_dataset(out, seed=4, per_class=3, size=24)
    with Image.open(out / "sketch" / "one" / "sketch_one_0002.png") as im:
        assert im.size == (24, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # nothing stale left


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    with pytest.raises(FileExistsError):
        world.generate_dataset(out, seed=0, per_class=1, size=SIZE)
    assert (out / "precious.txt").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # temp dir cleaned up


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "w"
    calls = {"n": 0}
    real = world.render

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(world, "render", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        world.generate_dataset(out, seed=0, per_class=2, size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_domains_are_distinct(dataset):
    """Nearest-centroid on raw 8x8 pixels tells the domain of held-out images."""
    split = PER_CLASS // 2
    xtr, ytr, xte, yte = [], [], [], []
    for d, domain in enumerate(world.DOMAINS):
        for cls in world.CLASSES:
            for i in range(PER_CLASS):
                x = _pixels(dataset / domain / cls / f"{domain}_{cls}_{i:04d}.png")
                (xtr if i < split else xte).append(x)
                (ytr if i < split else yte).append(d)
    acc = _nearest_centroid_accuracy(*map(np.asarray, (xtr, ytr, xte, yte)))
    assert acc > 0.8, f"domain accuracy {acc:.3f} (chance 0.25)"


def _domain_digit_set(domain: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for digit in range(10):
        for _ in range(n):
            im = world.render(domain, digit, rng).convert("L").resize((16, 16), Image.Resampling.BOX)
            xs.append(np.asarray(im, dtype=np.float32).ravel() / 255.0)
            ys.append(digit)
    return np.asarray(xs), np.asarray(ys)


def test_printed_digits_are_learnable():
    """1-nearest-neighbour on raw 16x16 pixels recognises printed digits of held-out images."""
    xtr, ytr = _domain_digit_set("printed", 60, seed=10)
    xte, yte = _domain_digit_set("printed", 20, seed=11)
    dist = ((xte[:, None, :] - xtr[None]) ** 2).sum(-1)
    acc = float((ytr[dist.argmin(1)] == yte).mean())
    assert acc > 0.4, f"printed digit accuracy {acc:.3f} (chance 0.1)"


def test_handwritten_digits_are_learnable():
    xtr, ytr = _domain_digit_set("handwritten", 30, seed=12)
    xte, yte = _domain_digit_set("handwritten", 15, seed=13)
    acc = _nearest_centroid_accuracy(xtr, ytr, xte, yte)
    assert acc > 0.3, f"handwritten digit accuracy {acc:.3f} (chance 0.1)"


def test_sample_images_is_deterministic_and_differs_from_benchmark(dataset):
    a = list(world.sample_images(seed=0, per_class=2, size=SIZE))
    b = list(world.sample_images(seed=0, per_class=2, size=SIZE))
    c = list(world.sample_images(seed=5, per_class=2, size=SIZE))
    assert len(a) == len(world.DOMAINS) * 10 * 2
    assert [(d, k) for d, k, _ in a] == [
        (d, k) for d in world.DOMAINS for k in range(10) for _ in range(2)
    ]
    for (_, _, x), (_, _, y) in zip(a, b):
        assert x.size == (SIZE, SIZE) and x.mode == "RGB"
        assert x.tobytes() == y.tobytes()
    assert all(x.tobytes() != z.tobytes() for (_, _, x), (_, _, z) in zip(a, c))
    # Even with the benchmark's seed, no pretraining image equals a benchmark image.
    bench = set()
    for p in _files(dataset):
        if p.suffix == ".png":
            with Image.open(p) as im:
                bench.add(im.convert("RGB").tobytes())
    assert not any(x.tobytes() in bench for _, _, x in a)


def test_handwritten_pretrain_and_benchmark_use_disjoint_scans():
    for digit in range(10):
        bench = set(renderers._handwritten_indices(digit, "benchmark").tolist())
        pre = set(renderers._handwritten_indices(digit, "pretrain").tolist())
        assert bench and pre and not bench & pre


def test_generation_is_fast(tmp_path):
    world.render("handwritten", 0, np.random.default_rng(0))  # warm caches (load_digits, font)
    t = time.process_time()  # CPU time: robust to other jobs sharing the machine
    world.generate_dataset(tmp_path / "w", seed=0, per_class=10, size=SIZE)
    elapsed = time.process_time() - t
    # 4 x 10 x 60 must take well under 30 s; 1/6 of that budget for 1/6 of the images.
    assert elapsed < 5.0, f"{elapsed:.1f} CPU s for 400 images"
