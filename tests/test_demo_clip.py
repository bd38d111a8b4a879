"""The demo world's real CLIP: built by the tool itself, with the properties the papers rely on.

Fast tests check the property computations (``promptdg_cli.demo.properties``) against values worked
out by hand on constructed features; the slow ones build the real demo CLIP once per session
(``built_demo_clip`` in conftest.py) and check its measured properties in bands.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from promptdg_cli.demo.captions import attribute_phrases, colour_name, make_caption
from promptdg_cli.demo.properties import confident_share, expected_calibration_error, measure_demo_clip, shift_cosine
from promptdg_cli.demo.world import CLASSES, DOMAINS, STYLE_WORDS, render

from conftest import results


# --------------------------------------------------------------------- property formulas
def test_ece_on_a_hand_made_example():
    conf = torch.tensor([0.95, 0.9, 0.65, 0.62, 0.3])
    correct = torch.tensor([True, False, True, True, False])
    # 15 bins of width 1/15: 0.95 -> (14/15, 1], 0.9 -> (13/15, 14/15], 0.65 and 0.62 -> (9/15, 10/15],
    # 0.3 -> (4/15, 5/15]; gaps |acc - conf|: 0.05, 0.9, |1 - 0.635| = 0.365 (2 items), 0.3
    by_hand = (0.05 + 0.9 + 2 * 0.365 + 0.3) / 5 * 100  # 39.6
    assert expected_calibration_error(conf, correct) == pytest.approx(by_hand, abs=1e-5)
    # one bin holding everything (M = 1): |mean acc - mean conf| = |3/5 - 0.684|
    assert expected_calibration_error(conf, correct, bins=1) == pytest.approx(abs(0.6 - 0.684) * 100, abs=1e-5)
    # perfectly calibrated: half right at confidence 0.5
    assert expected_calibration_error(torch.full((4,), 0.5), torch.tensor([1, 0, 1, 0]).bool()) == pytest.approx(0.0)


def test_confident_share():
    conf = torch.tensor([0.95, 0.9, 0.65, 0.62, 0.3])
    correct = torch.tensor([True, False, True, True, False])
    assert confident_share(conf, correct, tau=0.6) == pytest.approx((80.0, 75.0))  # 4 kept, 3 right
    share, acc = confident_share(conf, correct, tau=0.99)
    assert share == 0.0 and acc is None


def test_shift_cosine_on_constructed_features():
    e = torch.eye(3)
    # text shift (0, 1, 0), image shift (0, 2, 0): same direction
    assert shift_cosine(e[0] + e[1], e[0], 2 * e[1] + 2 * e[2], 2 * e[2]) == pytest.approx(1.0)
    # image shift (0, 1, 1): 45 degrees
    assert shift_cosine(e[0] + e[1], e[0], e[1] + e[2], torch.zeros(3)) == pytest.approx(1 / math.sqrt(2))
    # opposite
    assert shift_cosine(e[0] + e[1], e[0], -e[1], torch.zeros(3)) == pytest.approx(-1.0)


class _FakeBackbone:
    """Image of domain d predicted as class p -> normalize(e_p + e_{10+d}); prompt of class c ->
    normalize(e_c [+ e_{10+d} when it starts with "a <style word of d> of a "]), 14-dimensional.
    The image's red and green values carry p and d. "a photo of a {}." names the photo style, as in CLIP."""

    def __init__(self, scale: float):
        self.logit_scale = torch.tensor(scale)
        self.device = torch.device("cpu")

    @staticmethod
    def preprocess(im):
        r, g, _ = im.getpixel((0, 0))
        return torch.tensor([r // 20, g // 20])

    @staticmethod
    def encode_image(x):
        return F.normalize(F.one_hot(x[:, 0], 14).float() + F.one_hot(10 + x[:, 1], 14).float(), dim=-1)

    @staticmethod
    def encode_text(prompts):
        out = []
        for p in prompts:
            v = F.one_hot(torch.tensor(CLASSES.index(p.rstrip(".").split(" ")[-1])), 14).float()
            for d, domain in enumerate(DOMAINS):
                if any(p.startswith(f"a {s} of a ") for s in STYLE_WORDS[domain]):
                    v = v + F.one_hot(torch.tensor(10 + d), 14).float()
            out.append(F.normalize(v, dim=0))
        return torch.stack(out)


def test_measure_demo_clip_on_constructed_features(tmp_path):
    # sketch: of each class's two images, one is predicted right and one as the next class (top-1 50 %);
    # elsewhere every image is predicted right; predictions stay balanced over classes in every domain
    for d_idx, domain in enumerate(DOMAINS):
        for k, name in enumerate(CLASSES):
            (tmp_path / domain / name).mkdir(parents=True)
            for i in range(2):
                p = (k + 1) % 10 if domain == "sketch" and i == 1 else k
                Image.new("RGB", (4, 4), (20 * p, 20 * d_idx, 0)).save(tmp_path / domain / name / f"{i}.png")
    # "a photo of a {}.": every class prompt carries e_photo, so an image's cosines differ by 1/2 between
    # its predicted class and the others (1 vs 1/2 in photo, 1/2 vs 0 elsewhere): confidence
    # e^(s/2) / (e^(s/2) + 9) = 36 / 45 = 0.8 with s = 2 ln 36
    scale = 2 * math.log(36)
    p = measure_demo_clip(_FakeBackbone(scale), tmp_path, tau=0.6)
    assert p["logit_scale"] == pytest.approx(scale, abs=0.01)
    for template in ("{}", "a photo of a {}."):
        assert p["top1"][template] == {d: (50.0 if d == "sketch" else 100.0) for d in DOMAINS}
    assert p["ece"] == pytest.approx({d: (30.0 if d == "sketch" else 20.0) for d in DOMAINS})  # |acc - 0.8|
    assert p["confident_share"] == {d: 100.0 for d in DOMAINS}
    assert p["confident_top1"] == {d: (50.0 if d == "sketch" else 100.0) for d in DOMAINS}
    # text shift: normalize(e_c + e_s) - e_c; image shift: (e_s - mean over the 4 domain axes) / sqrt(2)
    # dot = (1/sqrt2)(1/sqrt2)(3/4) = 3/8; |text| = sqrt(2 - sqrt2); |image| = sqrt(3) / (2 sqrt2)
    by_hand = 0.375 / (math.sqrt(2 - math.sqrt(2)) * math.sqrt(3) / (2 * math.sqrt(2)))
    assert p["style_shift_cos"] == pytest.approx({d: round(by_hand, 3) for d in DOMAINS})
    assert p["summary"]["common_top1"] == 100.0 and p["summary"]["rare_top1"] == 75.0


# --------------------------------------------------------------------- captions
def test_colour_names():
    assert colour_name((0, 0, 0)) == "black" and colour_name((255, 255, 255)) == "white"
    assert colour_name((128, 128, 128)) == "grey"
    assert colour_name((230, 20, 20)) == "red" and colour_name((20, 200, 20)) == "green"
    assert colour_name((30, 40, 200)) == "blue" and colour_name((20, 30, 90)) == "navy"


def test_captions_describe_what_was_drawn():
    rng = np.random.default_rng(0)
    attrs: dict = {}
    render("printed", 7, rng, split="pretrain", attrs=attrs)
    phrases = attribute_phrases("printed", attrs)
    assert f"in {colour_name(attrs['ink'])}" in phrases and any("paper" in p for p in phrases)
    assert ("large" in phrases) == (attrs["height"] > 0.75)
    every = make_caption("printed", 7, attrs, np.random.default_rng(1), style_share=1.0, attribute_share=1.0, noise=0.0,
                         max_phrases=len(phrases))
    assert "seven" in every and all(p in every for p in phrases)
    assert any(f"a {s} of a seven" in every for s in STYLE_WORDS["printed"])
    bare = make_caption("printed", 7, attrs, np.random.default_rng(1), style_share=0.0, attribute_share=0.0,
                        noise=0.0, period_share=0.0)
    assert bare in ("a seven", "seven", "the number seven", "digit 7")


def test_render_attributes_do_not_change_the_image():
    for domain in DOMAINS:
        a = render(domain, 3, np.random.default_rng(5), split="benchmark")
        b = render(domain, 3, np.random.default_rng(5), split="benchmark", attrs={})
        assert np.array_equal(np.asarray(a), np.asarray(b)), domain


def test_the_demo_clip_trains_with_the_build_thread_count(monkeypatch, tmp_path):
    """Its weights depend on the thread count (float sums in another order): make demo (two threads) and
    a one-thread claims arm must train it alike. The build is stopped where the training would start."""
    from promptdg_cli.demo import BUILD_THREADS, pretrain

    seen = []

    def stop_here(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "pretraining_set", stop_here)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            with pytest.raises(KeyboardInterrupt):
                pretrain.build_demo_clip(tmp_path / "clip.safetensors", "demo-clip-vit")
            assert torch.get_num_threads() == threads  # given back, after an interrupt too
    finally:
        torch.set_num_threads(before)
    assert seen == [BUILD_THREADS, BUILD_THREADS]


# --------------------------------------------------------------------- the real demo CLIP
@pytest.mark.slow
def test_demo_clip_has_the_properties_the_papers_rely_on(built_demo_clip):
    from promptdg_cli.demo.pretrain import checkpoint_properties

    p = checkpoint_properties(built_demo_clip)
    assert p["logit_scale"] >= 50, p
    top1 = p["top1"]["a photo of a {}."]
    assert min(top1["printed"], top1["photo"]) > max(top1["sketch"], top1["handwritten"]) + 5, top1
    assert all(20 <= top1[d] <= 90 for d in ("sketch", "handwritten")), top1  # above chance, not solved
    assert p["summary"]["common_top1"] >= p["summary"]["rare_top1"] + 10, p["summary"]
    assert all(c >= 0.3 for c in p["style_shift_cos"].values()), p["style_shift_cos"]
    assert all(e <= 25 for e in p["ece"].values()), p["ece"]


@pytest.mark.slow
def test_demo_clip_zero_shot_through_the_cli(run_cli, built_demo_clip, monkeypatch):
    """`promptdg eval` on the benchmark with the built checkpoint (not rebuilt) gives the figures it was built with."""
    from promptdg_cli.demo.pretrain import checkpoint_properties

    monkeypatch.setenv("PROMPTDG_CACHE", str(built_demo_clip.parent.parent))
    code, out, err, out_root = run_cli("eval", "method=zeroshot", "num_workers=0", tiny=False)
    assert code == 0, err
    assert "building the demo CLIP" not in out
    (rec,) = results(out_root)
    built = checkpoint_properties(built_demo_clip)["top1"]["a photo of a {}."]
    # the CLI evaluates the test split of each domain (all of it in DG, the held-out domain): same images or a subset
    assert set(rec["accuracy"]) == set(DOMAINS)
    for d in DOMAINS:
        assert abs(rec["accuracy"][d] - built[d]) <= 5.0, (d, rec["accuracy"], built)
