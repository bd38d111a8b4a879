"""PromptStyler: its three losses against hand computations, the prompt layout, the source-free
guarantee (no image is read in training), resume, and re-evaluation."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from promptdg_cli.methods.base import RunEnv
from promptdg_cli.methods.promptstyler import (
    PromptStyler,
    StylePrompts,
    arcface_logits,
    arcface_loss,
    content_consistency_loss,
    style_diversity_loss,
)
from promptdg_cli.protocols import TrainData
from promptdg_cli.training import TrainContext

from conftest import method_cfg, results

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

TINY_STYLER = ("method=promptstyler", "method.n_styles=3", "method.style_iters=2", "method.epochs=2")


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# --------------------------------------------------------------------- losses by hand
def test_style_diversity_is_mean_absolute_cosine_to_earlier_styles():
    style = [1.0, 2.0, 0.0]
    earlier = [[0.0, 1.0, 0.0], [-3.0, 0.0, 4.0], [1.0, -2.0, 2.0]]
    by_hand = sum(abs(_cos(style, e)) for e in earlier) / 3
    got = style_diversity_loss(torch.tensor(style), torch.tensor(earlier))
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # |cos|: a style opposite to an earlier one is as bad as an identical one
    assert style_diversity_loss(torch.tensor(style), -torch.tensor(earlier)).item() == pytest.approx(by_hand, rel=1e-6)


def test_first_style_has_zero_diversity_loss_with_a_gradient_path():
    s = torch.tensor([0.3, -0.1], requires_grad=True)
    loss = style_diversity_loss(s, torch.zeros(0, 2))
    assert loss.item() == 0.0
    loss.backward()  # no error: the term is part of the graph
    assert torch.equal(s.grad, torch.zeros(2))


def test_content_consistency_is_cross_entropy_over_cosines_without_temperature():
    sc = [[1.0, 0.2], [0.1, 1.0], [-1.0, 0.5]]  # style-content features of classes 0, 1, 2
    content = [[2.0, 0.0], [0.0, 0.5], [-1.0, 1.0]]
    by_hand = 0.0
    for m in range(3):
        z = [_cos(sc[m], content[n]) for n in range(3)]
        by_hand += -(z[m] - math.log(sum(math.exp(v) for v in z)))
    by_hand /= 3
    got = content_consistency_loss(torch.tensor(sc), torch.tensor(content))
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


def _arcface_by_hand(f, W, y, s, m):
    total = 0.0
    for fi, yi in zip(f, y):
        logits = []
        for j, w in enumerate(W):
            c = _cos(fi, w)  # normalised weight AND feature
            if j == yi:
                theta = math.acos(c)
                c = math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)
            logits.append(s * c)
        total += -(logits[yi] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(y)


def test_arcface_loss_by_hand_with_unnormalised_weights():
    f = [[3.0, 1.0, 0.0], [0.0, -1.0, 2.0]]
    W = [[2.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 5.0]]  # rows of very different norms
    y = [0, 2]
    got = arcface_loss(torch.tensor(f), torch.tensor(W), torch.tensor(y), s=5.0, m=0.5)
    assert got.item() == pytest.approx(_arcface_by_hand(f, W, y, 5.0, 0.5), rel=1e-5)


def test_arcface_weights_are_normalised_the_public_bug_would_fail():
    """The shared bug: cos θ computed as <f/‖f‖, W_j> with raw W. Scaling a class's weight row then
    changes its logit; with normalised weights it must not."""
    torch.manual_seed(0)
    f, W, y = torch.randn(6, 4), torch.randn(3, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    scaled = W * torch.tensor([[10.0], [0.1], [3.0]])
    assert torch.allclose(arcface_logits(f, W, y, 5.0, 0.5), arcface_logits(f, scaled, y, 5.0, 0.5), atol=1e-5)
    # and the bug is distinguishable on these numbers (so the test above has teeth)
    buggy_cos = F.normalize(f, dim=-1) @ W.T  # raw weights
    true_cos = F.normalize(f, dim=-1) @ F.normalize(W, dim=-1).T
    assert not torch.allclose(buggy_cos, true_cos, atol=1e-2)


def test_arcface_beyond_pi_minus_m_uses_the_monotone_continuation():
    m = 0.5
    f = [[-1.0, 0.05]]  # almost opposite to the class-0 weight: θ > π − m
    W = [[1.0, 0.0], [0.0, 1.0]]
    c = _cos(f[0], W[0])
    assert math.acos(c) > math.pi - m
    logits = arcface_logits(torch.tensor(f), torch.tensor(W), torch.tensor([0]), 5.0, m)
    assert logits[0, 0].item() == pytest.approx(5.0 * (c - m * math.sin(m)), rel=1e-5)
    assert logits[0, 1].item() == pytest.approx(5.0 * _cos(f[0], W[1]), rel=1e-5)


# --------------------------------------------------------------------- prompts and the text path
def test_style_prompts_splice_the_style_word_and_stop_at_the_last_eot(clip):
    names = ["one", "alarm clock", "two"]
    prompts = StylePrompts(clip, names, "a {} style of a")
    style = torch.randn(clip.text_width)
    emb, _ = prompts(style).full()  # the plain form of the one group
    tokens = clip.tokenize(["a x style of a"] + [f"a x style of a {n}" for n in names])
    full = clip.token_embedding(tokens)
    assert prompts.position == 2  # [SOS] a S_* style of a ...
    assert emb.shape[:2] == (4, int(clip.eot_positions(tokens).max()) + 1) and emb.shape[1] < 77
    assert torch.equal(emb[:, 2], style.expand(4, -1))
    keep = [i for i in range(emb.shape[1]) if i != 2]
    assert torch.equal(emb[:, keep], full[:, keep])


def test_style_features_equal_the_full_77_token_computation(clip):
    cfg = method_cfg("promptstyler", "n_styles=2")
    ps = PromptStyler(cfg, clip, ["one", "alarm clock"], torch.device("cpu"))
    style = torch.randn(clip.text_width) * 0.02
    short = ps.encode(style)  # one batch through the shared-prefix path
    short = torch.cat([short[0][None], short[1]])
    tokens = clip.tokenize(["a x style of a", "a x style of a one", "a x style of a alarm clock"])
    full = clip.token_embedding(tokens).clone()
    full[:, 2] = style
    long = clip.encode_prompts(full, clip.eot_positions(tokens), truncate=False)
    assert torch.allclose(short, long, atol=1e-5)


def test_bad_style_template_is_a_clear_error(clip):
    with pytest.raises(ValueError, match="style word"):
        StylePrompts(clip, ["one"], "a style of a")  # no {} for the style word


# --------------------------------------------------------------------- training
def _ctx(tmp_path, seed=1):
    (tmp_path / "split").mkdir(exist_ok=True)
    return TrainContext(tmp_path, tmp_path / "split", "all", seed, torch.device("cpu"))


def test_styles_are_learned_in_turn_earlier_ones_frozen(clip, tmp_path, monkeypatch):
    cfg = method_cfg("promptstyler", "n_styles=3", "style_iters=4", "epochs=2", "style_lr=0.5")
    ps = PromptStyler(cfg, clip, ["one", "two", "three"], torch.device("cpu"), RunEnv(seed=1))
    snapshots = []
    save = TrainContext._save
    monkeypatch.setattr(
        TrainContext,
        "_save",
        lambda self, sec, st: (
            snapshots.append(
                (sec, {k: {i: dict(r) for i, r in v.items()} if k == "results" else v for k, v in st.items()})
            )
            or save(self, sec, st)
        ),
    )
    ps.fit(TrainData(), _ctx(tmp_path))
    after = [st["results"] for sec, st in snapshots if sec == "units:styles"]
    assert [sorted(r) for r in after] == [[0], [0, 1], [0, 1, 2]]  # one checkpoint after each style
    for k in range(1, 3):  # learning style k leaves styles < k untouched
        for j in range(k):
            assert torch.equal(after[k][j]["vector"], after[k - 1][j]["vector"])
    for i in range(3):  # every style moved away from its initialisation
        assert not torch.allclose(ps.styles[i], ps.init_style(i))
    # the stored style features are those of the stored style words
    with torch.no_grad():
        assert torch.allclose(after[-1][2]["feature"], ps.encode(ps.styles[2])[0], atol=1e-6)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["style"] for l in lines if l.get("stage") == "style"] == [0, 1, 2]
    assert [l["epoch"] for l in lines if "epoch" in l] == [0, 1]  # then the classifier's epochs


def test_style_learning_lowers_the_style_and_content_losses(clip, tmp_path):
    """The objective of style 1 (L_style against the learned S_0, the one style 1 was trained
    against, + L_content), at its initialisation and after its L iterations."""
    cfg = method_cfg("promptstyler", "n_styles=2", "style_iters=25", "epochs=1", "style_lr=0.5")
    ps = PromptStyler(cfg, clip, ["one", "two", "three", "four"], torch.device("cpu"), RunEnv(seed=1))
    content = clip.encode_text(ps.classnames).detach()
    ps.fit(TrainData(), _ctx(tmp_path))

    def objective(style):
        with torch.no_grad():
            f, sc = ps.encode(style)
            s0 = ps.encode(ps.styles[0])[0]
            return (style_diversity_loss(f, s0[None]) + content_consistency_loss(sc, content)).item()

    assert objective(ps.styles[1]) < objective(ps.init_style(1))


def test_classifier_prediction_uses_normalised_weights(clip):
    ps = PromptStyler(method_cfg("promptstyler", "n_styles=1"), clip, ["a", "b", "c"], torch.device("cpu"))
    x = F.normalize(torch.randn(5, clip.embed_dim), dim=-1)
    before = ps.logits(x)
    ps.classifier.weight.data *= torch.tensor([[100.0], [0.01], [1.0]])
    assert torch.allclose(ps.logits(x), before, atol=1e-5)


# --------------------------------------------------------------------- the engine: source-free
def test_training_reads_no_image_and_tests_every_domain(run_cli, monkeypatch):
    import PIL.Image

    from promptdg_cli import data

    training = {"on": False, "fits": 0, "reads_after": 0}

    def guard(name, real):
        def wrapped(*a, **k):
            if training["on"]:
                raise AssertionError(f"source-free training touched the images: {name}")
            training["reads_after"] += training["fits"] > 0
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(PIL.Image, "open", guard("PIL.Image.open", PIL.Image.open))
    monkeypatch.setattr(data, "list_domain", guard("list_domain", data.list_domain))
    monkeypatch.setattr(
        data.FeatureCache, "domain_features", guard("domain_features", data.FeatureCache.domain_features)
    )
    monkeypatch.setattr(data.FeatureCache, "_encode", guard("_encode", data.FeatureCache._encode))
    real_fit = PromptStyler.fit

    def fit(self, d, ctx):
        assert d == TrainData()  # no features, no labels, no paths
        training["on"] = True
        try:
            real_fit(self, d, ctx)
        finally:
            training["on"] = False
            training["fits"] += 1

    monkeypatch.setattr(PromptStyler, "fit", fit)
    code, out, err, out_root = run_cli("train", *TINY_STYLER)
    assert code == 0, err
    assert training["fits"] == 1 and training["reads_after"] >= 4  # the guard was live for evaluation
    (rec,) = results(out_root)
    assert rec["source_free"] is True and rec["status"] == "finished"
    assert list(rec["accuracy"]) == ["handwritten", "printed", "sketch", "photo"]  # every domain: no source
    assert all(v == [] for v in rec["source_domains"].values())
    run_dir = Path(rec["run_dir"])
    model = load_file(str(run_dir / "splits" / "all" / "model.safetensors"))
    assert model["styles"].shape[0] == 3 and model["classifier"].shape[0] == 10


def test_source_is_rejected_and_target_restricts_the_tested_domains(run_cli):
    code, _, err, _ = run_cli("train", *TINY_STYLER, "source=[printed]")
    assert code == 2 and "source-free" in err and "source=" in err
    code, _, err, out_root = run_cli("train", *TINY_STYLER, "target=sketch")
    assert code == 0, err
    (rec,) = [r for r in results(out_root) if r["status"] == "finished"]
    assert list(rec["accuracy"]) == ["sketch"]


def test_interrupted_promptstyler_resumes_with_identical_results(run_cli, monkeypatch, tmp_path):
    code, _, _, out_root = run_cli("train", *TINY_STYLER)
    (reference,) = results(out_root)
    ref_model = load_file(str(Path(reference["run_dir"]) / "splits" / "all" / "model.safetensors"))

    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "interrupted"))
    saved, calls = TrainContext._save, []

    def dying_save(self, section, state):
        saved(self, section, state)
        calls.append(1)
        if len(calls) == 2:  # after the second style
            raise KeyboardInterrupt("simulated preemption")

    monkeypatch.setattr(TrainContext, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_cli("train", *TINY_STYLER)
    monkeypatch.setattr(TrainContext, "_save", saved)
    code, _, err, _ = run_cli("train", *TINY_STYLER)
    assert code == 0, err
    (resumed,) = results(tmp_path / "interrupted")
    model = load_file(str(Path(resumed["run_dir"]) / "splits" / "all" / "model.safetensors"))
    assert torch.equal(model["styles"], ref_model["styles"])
    assert torch.allclose(model["classifier"], ref_model["classifier"], atol=1e-6)
    assert resumed["accuracy"] == reference["accuracy"]
    styles = [
        json.loads(l)["style"]
        for l in (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        if '"style"' in l and '"stage": "style"' in l
    ]
    assert styles == [0, 1, 2]  # styles 0 and 1 before the interruption, only style 2 after it


def test_eval_reevaluates_a_promptstyler_run_on_every_domain(run_cli):
    code, _, _, out_root = run_cli("train", *TINY_STYLER)
    (rec,) = results(out_root)
    code, out, err, _ = run_cli("eval", f"run_dir={rec['run_dir']}")
    assert code == 0, err
    again = [r for r in results(out_root) if r.get("evaluated_run")]
    assert len(again) == 1 and again[0]["accuracy"] == rec["accuracy"]


def test_experiment_sweep_then_collect_prints_the_papers_shape(run_cli, monkeypatch):
    """The demo version of the paper's sweep: both zero-shot rows and PromptStyler, datasets as columns."""
    init = PromptStyler.__init__

    def small(self, cfg, *a):  # method.* overrides cannot go on a command line that sweeps methods
        cfg.n_styles, cfg.style_iters, cfg.epochs = 2, 2, 2
        init(self, cfg, *a)

    monkeypatch.setattr(PromptStyler, "__init__", small)
    code, _, err, out_root = run_cli("train", "-m", "experiment=promptstyler_demo", "seed=1,2")
    assert code == 0, err
    recs = results(out_root)
    assert len(recs) == 6  # 3 methods x 2 seeds (the command line narrowed the experiment's seeds)
    assert {(r["method"], r["variant"]) for r in recs} == {
        ("zeroshot", "[class]"),
        ("zeroshot", "a photo of a [class]."),
        ("promptstyler", ""),
    }
    code, out, err, _ = run_cli("collect", str(out_root / "promptstyler_demo"), "--columns", "dataset", tiny=False)
    assert code == 0, err
    header = next(l for l in out.splitlines() if l.startswith("| Method"))
    assert [c.strip() for c in header.split("|")[3:5]] == ["demo_digits", "Avg"]
    rows = [l for l in out.splitlines() if l.startswith("| zeroshot") or l.startswith("| promptstyler")]
    assert len(rows) == 3 and rows[-1].startswith("| promptstyler")
