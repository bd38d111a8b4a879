"""DAPT: the dispersion losses by hand, prototypes, per-dataset defaults, the ResNet refusal, and a
tiny end-to-end run through the visual prompts."""
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from promptdg_cli.methods.dapt import (
    DAPT,
    class_prototypes,
    inter_dispersion_loss,
    intra_dispersion_loss,
)

from conftest import method_cfg, results

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

def _unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def test_inter_dispersion_by_hand():
    w = [[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]
    u = [_unit(v) for v in w]
    t = 2.0
    pairs = [(m, n) for m in range(3) for n in range(3) if m != n]
    by_hand = sum(math.exp(-t * sum((a - b) ** 2 for a, b in zip(u[m], u[n]))) for m, n in pairs) / len(pairs)
    assert inter_dispersion_loss(torch.tensor(w), t).item() == pytest.approx(by_hand, rel=1e-6)


def test_intra_dispersion_by_hand_official_and_paper_forms():
    z = [[3.0, 4.0], [0.0, -2.0], [1.0, 1.0]]
    y = [0, 1, 0]
    protos = [[0.5, 0.5], [0.0, -1.0]]
    squares = [[(a - b) ** 2 for a, b in zip(_unit(zi), protos[yi])] for zi, yi in zip(z, y)]
    # the official code: F.mse_loss(image_features, prototypes[labels]) = mean over all B*D elements
    official = sum(sum(r) for r in squares) / (3 * 2)
    # the paper's equation: mean over the batch of the squared distance
    paper = sum(sum(r) for r in squares) / 3
    args = (torch.tensor(z), torch.tensor(y), torch.tensor(protos))
    assert intra_dispersion_loss(*args).item() == pytest.approx(official, rel=1e-6)  # the default is the official scale
    assert intra_dispersion_loss(*args, form="official").item() == pytest.approx(official, rel=1e-6)
    assert intra_dispersion_loss(*args, form="paper").item() == pytest.approx(paper, rel=1e-6)


def test_intra_dispersion_official_scale_at_clip_width():
    """At D = 512 (ViT-B/16) the official L_intra is 1/512 of the paper's form: the scale the official
    beta_v were tuned at."""
    g = torch.Generator().manual_seed(0)
    z, protos = (
        torch.randn(6, 512, generator=g),
        torch.nn.functional.normalize(torch.randn(3, 512, generator=g), dim=-1),
    )
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    zn = z / z.norm(dim=-1, keepdim=True)
    expected = ((zn - protos[y]) ** 2).mean()  # torch.nn.functional.mse_loss written out
    got = intra_dispersion_loss(z, y, protos)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert intra_dispersion_loss(z, y, protos, form="paper").item() == pytest.approx(512 * expected.item(), rel=1e-5)


def test_prototypes_are_class_means_optionally_renormalised():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([0, 0, 2])
    p = class_prototypes(x, y, 3, renormalize=False)
    assert torch.allclose(p[0], torch.tensor([0.5, 0.5])) and torch.equal(p[1], torch.zeros(2))
    assert torch.allclose(p[2], torch.tensor([0.6, 0.8]))
    assert torch.allclose(class_prototypes(x, y, 3, renormalize=True)[0].norm(), torch.tensor(1.0))


def _dapt_cfg(*overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from promptdg_cli.config import conf_dir, register_configs, register_resolvers

    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["method=dapt", *overrides])
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.method, resolve=True)


def test_official_defaults_by_dataset_and_shots():
    """The official configs' values (mlvlab/DAPT configs/datasets/*.yaml, scripts/main.sh), composed."""
    m = _dapt_cfg("dataset=dtd", "shots=16")
    assert (m["lr"], m["beta_v"], m["beta_t"], m["epochs"]) == (20.0, 100.0, 0.01, 200)
    assert _dapt_cfg("dataset=imagenet", "shots=16")["epochs"] == 50  # ImageNet: vit_b16_ep50 for every shot count
    assert _dapt_cfg("dataset=eurosat", "shots=4")["beta_t"] == 10.0
    assert [_dapt_cfg("dataset=caltech101", f"shots={k}")["epochs"] for k in (1, 2, 4, 8, 16)] == [
        50,
        100,
        100,
        200,
        200,
    ]
    # a dataset without an official config: the official code's own defaults (train.py), CoOp's rate
    demo = _dapt_cfg("dataset=demo_digits", "shots=4")
    assert (demo["lr"], demo["beta_v"], demo["beta_t"], demo["epochs"]) == (0.002, 0.1, 0.1, 100)
    assert _dapt_cfg("dataset=dtd", "shots=16", "method.lr=0.5")["lr"] == 0.5  # an explicit value wins


def test_visual_prompts_start_from_the_run_seed(clip):
    """Seeds 1-3 start from different VPT prompts, and a seed always from the same ones."""
    m = DAPT(method_cfg("dapt", "n_ctx=2", "n_visual=2"), clip, ["one", "two"], torch.device("cpu"))
    starts = {}
    for seed in (1, 2, 1):
        m.visual.initialize(seed)
        starts.setdefault(seed, []).append(m.visual.prompts.detach().clone())
    assert torch.equal(starts[1][0], starts[1][1]) and not torch.equal(starts[1][0], starts[2][0])
    bound = (6.0 / (3 * clip.model.visual.patch_size[0] ** 2 + m.visual.prompts.shape[-1])) ** 0.5
    assert m.visual.prompts.abs().max() <= bound


def test_resnet_backbone_is_refused_before_anything_loads(run_cli):
    code, _, err, _ = run_cli("train", "method=dapt", "backbone=rn50", tiny=False)
    assert code == 2 and "method=dapt" in err and "backbone=rn50" in err and "vit_b16" in err


def test_dapt_end_to_end_saves_only_the_prompts(run_cli):
    """(That the frozen encoder's weights never change is tested in test_vpt.py.)"""
    code, _, err, out_root = run_cli(
        "train", "method=dapt", "shots=2", "method.epochs=2", "method.n_visual=2", "method.n_ctx=2", "target=sketch"
    )
    assert code == 0, err
    (rec,) = results(out_root)
    model = load_file(str(Path(rec["run_dir"]) / "splits" / "sketch" / "model.safetensors"))
    assert set(model) == {"ctx", "visual"} and model["visual"].shape[:2] == (1, 2)
    lines = (Path(rec["run_dir"]) / "metrics.jsonl").read_text()
    assert '"shots": 20' in lines  # 2 per class x 10 classes from the source training split


def test_few_shot_protocol_end_to_end_coop_and_dapt(run_cli, tmp_path, random_clip):
    """A tiny CoOp-layout split-file dataset: k shots per class train, the whole test split tested."""
    from test_fewshot import JSON_CLASSES, make_pets

    make_pets(tmp_path)
    common = (f"data_root={tmp_path}", "dataset=oxford_pets", "shots=2", "method.epochs=1",
              "backbone.builder=null", "num_workers=0", f"backbone.pretrained={random_clip}")
    code, _, err, out_root = run_cli("train", "-m", "method=coop,dapt", *common, "method.n_ctx=2", tiny=False)
    assert code == 0, err
    recs = results(out_root)
    assert {r["method"] for r in recs} == {"coop", "dapt"}
    for r in recs:
        assert r["protocol"] == "fewshot" and r["shots"] == 2 and list(r["accuracy"]) == ["oxford_pets"]
        assert Path(r["run_dir"]).name.startswith("seed1_all_2shot_")
    lines = (Path(next(r for r in recs if r["method"] == "dapt")["run_dir"]) / "metrics.jsonl").read_text()
    assert f'"shots": {2 * len(JSON_CLASSES)}' in lines  # k per class of the train split
    # another k is another run, never the same directory
    code, _, err, _ = run_cli("train", "method=coop", *common[:2], "shots=1", *common[3:], "method.n_ctx=2", tiny=False)
    assert code == 0, err
    assert len(results(out_root)) == 3


def test_evaluation_restricted_to_a_class_subset():
    """ImageNet-A/R cover 200 of ImageNet's 1000 classes: the prediction is the best of those."""
    from promptdg_cli.data import Features
    from promptdg_cli.evaluation import evaluate

    class Fixed:
        def features_for(self, feats):  # (scores the cached features, as Method does)
            return feats

        def logits(self, x):
            return torch.tensor([[9.0, 1.0, 0.0, 5.0], [9.0, 0.0, 3.0, 1.0]])

    feats = Features(torch.zeros(2, 3), torch.tensor([3, 2]), ["a", "a"], ["p", "q"])
    assert evaluate(Fixed(), feats)["top1"] == 0.0  # class 0 wins everywhere
    assert evaluate(Fixed(), feats, subset=[1, 2, 3])["top1"] == 100.0  # class 0 is not in the set


def test_imagenet_run_reevaluated_on_imagenet_a(run_cli, tmp_path, random_clip):
    from test_fewshot import make_imagenet, make_imagenet_a

    make_imagenet(tmp_path)
    make_imagenet_a(tmp_path)
    common = (f"data_root={tmp_path}", "backbone.builder=null", "num_workers=0", f"backbone.pretrained={random_clip}")
    code, _, err, out_root = run_cli(
        "train", "method=coop", "dataset=imagenet", "shots=2", "method.epochs=1", "method.n_ctx=2", *common, tiny=False
    )
    assert code == 0, err
    (rec,) = results(out_root)
    code, _, err, _ = run_cli("eval", f"run_dir={rec['run_dir']}", "dataset=imagenet_a", *common, tiny=False)
    assert code == 0, err
    (again,) = [r for r in results(out_root) if r.get("evaluated_run")]
    assert list(again["accuracy"]) == ["imagenet_a"] and again["class_subset"] == 2 and again["shots"] == 2
    # another label space is refused
    code, _, err, _ = run_cli("eval", f"run_dir={rec['run_dir']}", "dataset=demo_digits", tiny=True)
    assert code == 2 and "other classes" in err


def test_zero_shot_on_a_test_only_variant(run_cli, tmp_path, random_clip):
    from test_fewshot import make_imagenet, make_imagenet_a

    make_imagenet(tmp_path)
    make_imagenet_a(tmp_path)
    code, _, err, out_root = run_cli(
        "eval",
        "dataset=imagenet_a",
        f"data_root={tmp_path}",
        "backbone.builder=null",
        "num_workers=0",
        f"backbone.pretrained={random_clip}",
        tiny=False,
    )
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["method"] == "zeroshot" and list(rec["accuracy"]) == ["imagenet_a"]
