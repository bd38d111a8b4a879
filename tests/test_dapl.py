"""DAPL and the UDA protocol: the loss by hand, τ masking (all-masked batch = 0, not NaN), the prompt
layout, several source domains, every pair, and no target label in training or selection."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from promptdg_cli.methods.dapl import (
    DAPL,
    DomainPromptLearner,
    dapl_loss,
    masked_cross_entropy,
    pseudo_labels,
)
from promptdg_cli.protocols import uda_splits

from conftest import method_cfg, results

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

TINY_DAPL = ("method=dapl", "method.epochs=2", "method.n_ctx=2", "method.n_dom_ctx=2")


def _ce(logits, y):
    return -(logits[y] - math.log(sum(math.exp(v) for v in logits)))


# --------------------------------------------------------------------- the loss by hand
def test_dapl_loss_by_hand():
    # 2 domains (row 0 = source, row 1 = target) x 3 classes, unit features in 2-D
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [[0.6, 0.8], [-0.8, 0.6], [0.0, -1.0]]])
    s = 2.0
    x_src, d_src, y_src = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), torch.tensor([0, 2])
    x_tgt = torch.tensor([[0.6, 0.8], [0.8, -0.6], [0.0, 1.0]])
    pseudo, keep = torch.tensor([0, 2, 1]), torch.tensor([True, True, False])
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    src = [
        _ce([s * dot(x, t[d][k].tolist()) for k in range(3)], y)
        for x, d, y in zip(x_src.tolist(), d_src.tolist(), y_src.tolist())
    ]
    tgt = [
        _ce([s * dot(x, t[1][k].tolist()) for k in range(3)], y)
        for x, y, kp in zip(x_tgt.tolist(), pseudo.tolist(), keep.tolist())
        if kp
    ]
    U = 0.7
    by_hand = sum(src) / 2 + U * sum(tgt) / 2  # the target term averages over the kept images only
    total, l_src, l_tgt = dapl_loss(t, s, x_src, d_src, y_src, x_tgt, 1, pseudo, keep, U)
    assert l_src.item() == pytest.approx(sum(src) / 2, rel=1e-6)
    assert l_tgt.item() == pytest.approx(sum(tgt) / 2, rel=1e-6)
    assert total.item() == pytest.approx(by_hand, rel=1e-6)


def test_pseudo_labels_keep_only_confident_images():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.1, 0.0, 0.2], [0.0, 5.0, 0.0]])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    label, keep = pseudo_labels(logits, T=1.0, tau=0.6)
    assert label.tolist() == [0, 2, 1]
    assert keep.tolist() == [max(p) >= 0.6 for p in probs] == [True, False, True]
    # a higher temperature flattens the softmax: fewer images pass the same threshold
    assert pseudo_labels(logits, T=4.0, tau=0.6)[1].sum() < keep.sum()


def test_all_masked_target_batch_adds_zero_not_nan():
    logits = torch.randn(4, 3, requires_grad=True)
    none = torch.zeros(4, dtype=torch.bool)
    loss = masked_cross_entropy(logits, torch.tensor([0, 1, 2, 0]), none)
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))
    # in the full loss: the total is exactly the source term, with finite gradients
    t = F.normalize(torch.randn(2, 3, 5, requires_grad=True), dim=-1)
    x = F.normalize(torch.randn(4, 5), dim=-1)
    total, l_src, l_tgt = dapl_loss(
        t, 10.0, x, torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 0]), x, 1, torch.tensor([0, 1, 2, 0]), none, 1.0
    )
    assert l_tgt.item() == 0.0 and total.item() == pytest.approx(l_src.item())
    total.backward()


# --------------------------------------------------------------------- prompt layout
def test_prompt_rows_are_domain_major_with_shared_and_domain_context(clip):
    """The official prompt: 32 context slots, then "{class} , a {domain} image.." (DAPrompt's PromptLearner
    builds "X .. X " + name + " " + ", a {} image.".format(domain) + ".")."""
    names = ["one", "alarm clock", "three"]
    words = ["real world", "clipart"]
    p = DomainPromptLearner(clip, names, words, n_ctx=3, n_dom_ctx=2, class_specific=False, seed=0)
    emb, eot = p().full()  # (2 * 3, L, W): domain-major rows of the grouped prompts
    assert emb.shape[0] == 6
    for d, word in enumerate(words):
        tokens = clip.tokenize(["X X X X X " + n + " " + ", a {} image.".format(word) + "." for n in names])
        full = clip.token_embedding(tokens)
        for k in range(3):
            row = emb[d * 3 + k]
            assert torch.equal(row[1:4], p.ctx)  # domain-agnostic context, same in every row
            assert torch.equal(row[4:6], p.dom[d])  # domain d's context
            assert torch.equal(row[6:], full[k, 6 : emb.shape[1]])  # class k's name, ", a <domain> image..", EOS
            assert int(p.eot[d, k]) == int(tokens[k].argmax()) == int(eot[d * 3 + k])
    paper = DomainPromptLearner(
        clip, names, words, n_ctx=3, n_dom_ctx=2, class_specific=False, seed=0, suffix="{name}."
    )
    tokens = clip.tokenize([f"X X X X X {n}." for n in names])
    pe, _ = paper().full()
    assert torch.equal(pe[3 + 1, 6:], clip.token_embedding(tokens)[1, 6 : pe.shape[1]])  # the paper's form
    csc = DomainPromptLearner(clip, names, words, n_ctx=3, n_dom_ctx=2, class_specific=True, seed=0)
    assert csc.ctx.shape == (3, 3, clip.text_width)
    assert torch.equal(csc().full()[0][3 + 1, 1:4], csc.ctx[1])  # class-specific context follows the class


def test_official_prompt_ends_with_the_double_period_token(clip):
    """'image..' is one BPE token, not 'image' '.': the official text is kept token for token."""
    from promptdg_cli.methods.dapl import SUFFIXES

    text = SUFFIXES["official"].format(name="bike", domain="real world")
    ids = clip.tokenize([text])[0]
    eot = int(ids.argmax())
    single = clip.tokenize(["a."])[0]
    assert ids[eot - 1] != single[2]  # not the "." token
    assert eot == 1 + 7  # [SOS] bike , a real world image .. [EOT]


def test_target_prediction_uses_the_target_domain_prompts(clip):
    m = DAPL(method_cfg("dapl", "n_ctx=2", "n_dom_ctx=2"), clip, ["one", "two"], torch.device("cpu"))
    m.setup(["printed", "sketch", "photo"], "photo", seed=0)
    assert m.words == ["printed", "sketch", "photo"]
    x = F.normalize(torch.randn(4, clip.embed_dim), dim=-1)
    with torch.no_grad():
        expected = x @ m.text_features()[2].T
    assert torch.allclose(m.logits(x), expected, atol=1e-6)


def test_tau_defaults_to_the_papers_value_per_dataset():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from promptdg_cli.config import conf_dir, register_configs, register_resolvers

    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    taus = {}
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for d in ("visda17", "officehome", "demo_digits"):
            taus[d] = compose("train", overrides=["method=dapl", f"dataset={d}"]).method.tau
        explicit = compose("train", overrides=["method=dapl", "dataset=visda17", "method.tau=0.3"]).method.tau
    GlobalHydra.instance().clear()
    assert taus == {"visda17": 0.5, "officehome": 0.6, "demo_digits": 0.6} and explicit == 0.3


def test_domain_words_are_the_configs_readable_names():
    from promptdg_cli.methods.dapl import domain_word

    assert domain_word({}, "Real World") == "real world" and domain_word({}, "real_world") == "real world"
    assert domain_word({"train": "synthetic"}, "train") == "synthetic"


def test_lr_is_stepped_every_batch_as_the_official_trainer_does(clip):
    """Dassl's cosine over MAX_EPOCH=25 behind a one-step linear warm-up, stepped after every batch
    (DAPrompt's forward_backward calls update_lr each batch): 1e-5 at batch 0, then
    lr (1 + cos(pi (k - 1) / 25)) / 2, which cycles with a period of 50 batches."""
    m = DAPL(method_cfg("dapl"), clip, ["one"], torch.device("cpu"))
    lr = 0.003
    expected = [1e-5] + [0.5 * lr * (1 + math.cos(math.pi * (k - 1) / 25)) for k in range(1, 80)]
    got = [m.lr(k // 10, k % 10, 10) for k in range(80)]  # 10 batches an epoch
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[26] == pytest.approx(0.0, abs=1e-12) and got[51] == pytest.approx(lr)  # back up after 50 batches
    per_epoch = DAPL(method_cfg("dapl", "lr_step=epoch"), clip, ["one"], torch.device("cpu"))
    assert [per_epoch.lr(e, s, 10) for e in (0, 1, 2) for s in (0, 9)] == pytest.approx(
        [1e-5, 1e-5, lr, lr] + [expected[2]] * 2
    )


# --------------------------------------------------------------------- the UDA protocol
def test_uda_splits_cover_pairs_and_several_sources():
    cfg = OmegaConf.create({"name": "officehome", "domains": ["art", "clipart", "product", "real_world"]})
    every = uda_splits(cfg, None, None)
    assert len(every) == 12 and every[0].key == "art→clipart" and every[0].dirname == "art_to_clipart"
    assert [s.key for s in uda_splits(cfg, "clipart", None)] == ["art→clipart", "product→clipart", "real_world→clipart"]
    assert [s.key for s in uda_splits(cfg, None, ["art"])] == ["art→clipart", "art→product", "art→real_world"]
    (multi,) = uda_splits(cfg, "clipart", ["art", "product"])
    assert multi.sources == ["art", "product"] and multi.key == "art+product→clipart"
    with pytest.raises(ValueError, match="unlabelled"):
        uda_splits(cfg, "clipart", ["clipart"])


def test_dapl_with_several_source_domains_end_to_end(run_cli):
    # dataset.metric=mean_per_class: the VisDA-2017 convention, recorded next to overall top-1
    code, out, err, out_root = run_cli(
        "train", *TINY_DAPL, "source=[handwritten,printed]", "target=sketch", "dataset.metric=mean_per_class"
    )
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["protocol"] == "uda" and list(rec["accuracy"]) == ["handwritten+printed→sketch"]
    assert list(rec["mean_per_class_accuracy"]) == ["handwritten+printed→sketch"]
    assert rec["source_domains"] == {"handwritten+printed→sketch": ["handwritten", "printed"]}
    model = load_file(str(Path(rec["run_dir"]) / "splits" / "handwritten+printed_to_sketch" / "model.safetensors"))
    assert model["dom"].shape[0] == 3 and int(model["target_row"][0]) == 2  # two sources + the target
    # re-evaluation reads the saved prompts back and tests on the pair's target
    code, out, err, _ = run_cli("eval", f"run_dir={rec['run_dir']}")
    assert code == 0, err
    (again,) = [r for r in results(out_root) if r.get("evaluated_run")]
    assert again["accuracy"] == {"sketch": rec["accuracy"]["handwritten+printed→sketch"]}


def test_no_target_label_reaches_training_or_model_selection(run_cli, monkeypatch, tmp_path):
    """Shuffle the target domain's labels: the learned prompts and the selected epoch stay identical."""
    from promptdg_cli import data

    args = ("train", *TINY_DAPL, "method.epochs=3", "source=[printed]", "target=photo")
    code, _, err, out_root = run_cli(*args)
    assert code == 0, err
    (ref,) = results(out_root)
    real = data.list_domain

    def shuffled(cfg, domain):
        paths, labels = real(cfg, domain)
        return (paths, [(y + 3) % 10 for y in labels]) if domain == "photo" else (paths, labels)

    from promptdg_cli import runner

    tested, real_eval = [], runner.evaluate
    monkeypatch.setattr(
        runner, "evaluate", lambda method, feats, **k: tested.append(feats.y.clone()) or real_eval(method, feats, **k)
    )
    monkeypatch.setattr(data, "list_domain", shuffled)
    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "shuffled"))
    code, _, err, _ = run_cli(*args)
    assert code == 0, err
    (other,) = results(tmp_path / "shuffled")
    a = load_file(str(Path(ref["run_dir"]) / "splits" / "printed_to_photo" / "model.safetensors"))
    b = load_file(str(Path(other["run_dir"]) / "splits" / "printed_to_photo" / "model.safetensors"))
    # equal up to CPU float non-determinism (~1e-9 between identical runs); a label leak moves them far more
    assert torch.allclose(a["ctx"], b["ctx"], atol=1e-6) and torch.allclose(a["dom"], b["dom"], atol=1e-6)
    assert ref["val_accuracy"] == other["val_accuracy"]
    # the labels did change, and the final test saw the changed ones
    photo_labels = torch.tensor(
        real(OmegaConf.load(Path(ref["run_dir"]) / ".hydra" / "config.yaml").dataset, "photo")[1]
    )
    assert any(len(y) == len(photo_labels) and torch.equal(y, (photo_labels + 3) % 10) for y in tested)


def test_every_pair_into_a_target_and_zeroshot_in_the_same_table(run_cli):
    code, _, err, out_root = run_cli(
        "train", "-m", "method=zeroshot,dapl", "method.epochs=1", "dataset.protocol=uda", "target=sketch"
    )
    assert code == 0, err
    recs = results(out_root)
    pairs = ["handwritten→sketch", "printed→sketch", "photo→sketch"]
    assert {r["method"]: sorted(r["accuracy"]) for r in recs} == {"zeroshot": sorted(pairs), "dapl": sorted(pairs)}
    code, out, err, _ = run_cli("collect", str(out_root), tiny=False)
    assert code == 0, err
    header = next(l for l in out.splitlines() if l.startswith("| Method"))
    assert [c.strip() for c in header.split("|")[3:7]] == pairs + ["Avg"]
    assert sum(l.startswith("| zeroshot") or l.startswith("| dapl") for l in out.splitlines()) == 2
