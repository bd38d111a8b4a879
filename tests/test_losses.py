"""The baselines' math against hand computations on three vectors."""
import math

import pytest
import torch
import torch.nn.functional as F

from promptdg_cli.methods.coop import CoOp

from conftest import method_cfg

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

def test_coop_loss_is_cross_entropy_of_scaled_cosines(clip):
    cfg = method_cfg("coop", "n_ctx=4")
    coop = CoOp(cfg, clip, ["one", "two", "three"], torch.device("cpu"))
    t = coop.class_features().detach()  # (3, D), unit norm
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    x = F.normalize(torch.tensor([t[0].tolist(), (t[1] + t[2]).tolist()]), dim=-1)  # two images
    y = torch.tensor([0, 2])
    s = clip.logit_scale.item()
    # by hand: -log softmax(s * cos)[y], averaged
    by_hand = 0.0
    for xi, yi in zip(x, y):
        cos = [float(xi @ t[k]) for k in range(3)]
        z = [s * c for c in cos]
        by_hand += -(z[yi] - math.log(sum(math.exp(v) for v in z)))
    by_hand /= 2
    assert coop.loss(x, y).item() == pytest.approx(by_hand, rel=1e-4)


def test_coop_prompt_layout_and_class_specific_context(clip):
    names = ["one", "the number two"]
    shared = CoOp(method_cfg("coop", "n_ctx=3"), clip, names, torch.device("cpu"))
    p, _ = shared.prompt().full()  # the plain form of the grouped prompts
    # [SOS] ctx ctx ctx <class tokens> . [EOS]: the context sits at positions 1..3 of every prompt
    assert torch.equal(p[0, 1:4], shared.prompt.ctx) and torch.equal(p[1, 1:4], shared.prompt.ctx)
    tokens = clip.tokenize([f"X X X {n}." for n in names])
    emb = clip.token_embedding(tokens)
    eot = clip.eot_positions(tokens)
    assert torch.equal(shared.prompt.eot, eot)
    assert torch.allclose(p[1, 4 : eot[1] + 1], emb[1, 4 : eot[1] + 1])  # class tokens, '.', EOS untouched
    assert p.shape[1] == int(eot.max()) + 1  # stored prompts stop at the last EOS (never 77 positions)
    csc = CoOp(method_cfg("coop", "n_ctx=3", "class_specific=True"), clip, names, torch.device("cpu"))
    assert csc.prompt.ctx.shape == (2, 3, clip.text_width)
    full, _ = csc.prompt().full()
    assert not torch.equal(full[0, 1:4], full[1, 1:4])


def test_coop_context_init_std(clip):
    torch.manual_seed(0)
    coop = CoOp(method_cfg("coop", "n_ctx=16"), clip, ["a"] * 10, torch.device("cpu"))
    assert coop.prompt.ctx.std().item() == pytest.approx(0.02, rel=0.15)


def test_coop_schedule_warmup_then_cosine(clip):
    """Dassl's schedule as the official code builds it: one constant warm-up epoch, then the cosine counted from 0."""
    coop = CoOp(method_cfg("coop", "n_ctx=2", "epochs=10"), clip, ["a"], torch.device("cpu"))
    assert coop.lr(0, 0, 1) == 1e-5
    assert coop.lr(5, 0, 1) == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 4 / 10)))


def test_zeroshot_ensemble_is_normalised_mean_of_template_features(clip):
    names = ["one", "two"]
    a = clip.encode_text(["a photo of a one.", "a photo of a two."])
    b = clip.encode_text(["one", "two"])
    by_hand = (a + b) / 2
    by_hand = by_hand / by_hand.norm(dim=-1, keepdim=True)
    w = clip.zeroshot_weights(names, ["a photo of a {}.", "{}"])
    assert torch.allclose(w, by_hand, atol=1e-6)
