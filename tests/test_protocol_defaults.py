"""The official protocols are the defaults: epochs by shots, the last epoch kept, no default that
selects on a test split, the official augmentation (its parameters, a fresh view per epoch shared by
every run that draws it), DAPL's pseudo-label on the augmented view, CoOp's zero-shot templates, and
the opt-ins that leave the official protocol recorded and marked in the tables."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision import transforms as T

from promptdg_cli.config import compose_run, conf_dir
from promptdg_cli.data import FeatureCache, augmented_transform
from promptdg_cli.errors import ConfigError
from promptdg_cli.methods import method_class
from promptdg_cli.methods.base import RunEnv
from promptdg_cli.methods.dapl import DAPL
from promptdg_cli.protocols import TrainData, protocol_for
from promptdg_cli.training import TrainContext
from promptdg_cli.views import FreshViews, Plain

from conftest import method_cfg, results

METHODS = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml"))
# the official scripts' config by shot count (CoOp's COOP.md, DAPT's scripts/main.sh)
OFFICIAL_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


# --------------------------------------------------------------------- epochs, selection, templates
@pytest.mark.parametrize("method", ["coop", "dapt"])
@pytest.mark.parametrize("k", sorted(OFFICIAL_EPOCHS))
def test_epochs_follow_the_shots_as_the_official_scripts(method, k):
    cfg = compose_run(f"method={method}", "dataset=dtd", f"shots={k}", "backbone=vit_b16")
    assert cfg.method.epochs == OFFICIAL_EPOCHS[k]
    assert compose_run(f"method={method}", "dataset=imagenet", f"shots={k}", "backbone=vit_b16").method.epochs == 50


def test_coop_on_dtd_16_shots_shows_the_official_protocol(run_cli):
    code, out, err, _ = run_cli("train", "--cfg=job", "--resolve", "method=coop", "dataset=dtd", "shots=16", tiny=False)
    assert code == 0, err
    method = OmegaConf.create(out).method
    assert (method.epochs, method.augment, method.select) == (200, "official", "last")


def test_no_default_anywhere_selects_on_a_test_split():
    """Every method x dataset default: never target_test, and select=val only where the run has
    validation data apart from the test split (else the combination is refused before anything runs)."""
    checked = 0
    for method in METHODS:
        for dataset in DATASETS:
            cfg = compose_run(f"method={method}", f"dataset={dataset}")
            select = str(cfg.method.get("select", "last"))
            assert select != "target_test", (method, dataset)
            try:
                protocol = protocol_for(cfg, method_class(cfg.method))
            except ConfigError:
                continue  # a refused combination (a domain method on a few-shot set, select=val without validation)
            if select == "val":
                split_paths = cfg.dataset.get("split_paths") or {}
                assert not (split_paths.get("val") and split_paths.get("val") == split_paths.get("test")), (
                    method,
                    dataset,
                )
                assert protocol.name in ("dg", "fewshot") or cfg.method.get("source_holdout"), (method, dataset)
            checked += 1
    assert checked > 50


def test_select_val_without_validation_data_is_refused():
    with pytest.raises(ConfigError, match="imagenet's val split is its test split"):
        cfg = compose_run("method=coop", "dataset=imagenet", "shots=16", "method.select=val")
        protocol_for(cfg, method_class(cfg.method))
    with pytest.raises(ConfigError, match="source_holdout=true"):
        cfg = compose_run("method=dapl", "method.select=val")
        protocol_for(cfg, method_class(cfg.method))


def test_zeroshot_coop_uses_coops_template_of_the_dataset():
    # CoOp's trainers/zsclip.py CUSTOM_TEMPLATES, written out
    official = {
        "dtd": "{} texture.",
        "eurosat": "a centered satellite photo of {}.",
        "oxford_pets": "a photo of a {}, a type of pet.",
        "ucf101": "a photo of a person doing {}.",
        "food101": "a photo of {}, a type of food.",
        "imagenet": "a photo of a {}.",
    }
    for dataset, template in official.items():
        cfg = compose_run("method=zeroshot_coop", f"dataset={dataset}")
        assert list(OmegaConf.to_container(cfg.method, resolve=True)["templates"]) == [template]
    assert list(compose_run("method=zeroshot_coop", "dataset=pacs").method.templates) == ["a photo of a {}."]


# --------------------------------------------------------------------- the official augmentation
def test_the_augmentation_is_dassls_training_transform():
    """Dassl's INPUT.TRANSFORMS of CoOp and DAPL: RandomResizedCrop(224, scale (0.08, 1), bicubic),
    RandomHorizontalFlip, ToTensor, Normalize with CLIP's mean and std."""
    plain = open_clip.image_transform(
        224, is_train=False, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)
    )
    steps = [t for t in augmented_transform(plain).transforms if not callable(getattr(t, "__name__", None))]
    crop = next(t for t in steps if isinstance(t, T.RandomResizedCrop))
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    flip = next(t for t in steps if isinstance(t, T.RandomHorizontalFlip))
    assert flip.p == 0.5 and steps.index(flip) == steps.index(crop) + 1
    norm = next(t for t in steps if isinstance(t, T.Normalize))
    assert tuple(norm.mean) == (0.48145466, 0.4578275, 0.40821073) and tuple(norm.std) == (
        0.26862954,
        0.26130258,
        0.27577711,
    )
    assert not any(isinstance(t, (T.Resize, T.CenterCrop)) for t in steps)


@pytest.fixture(scope="module")
def sketch(shared_cache):
    from promptdg_cli.demo.world import generate_dataset

    root = generate_dataset(shared_cache / "data" / "demo_digits", per_class=8)
    return sorted(str(p) for p in (root / "sketch").rglob("*.png"))


def test_fresh_views_are_drawn_per_epoch_and_image_and_shared_by_every_list(clip, shared_cache, tmp_path, sketch):
    paths = sketch[:12]
    cache = FeatureCache(shared_cache, num_workers=0)
    views = FreshViews(cache, clip, "demo_digits", "sketch-views-test", paths, seed=1)
    e0, e1 = views.epoch(0).clone(), views.epoch(1).clone()
    assert e0.shape == (12, clip.embed_dim) and not torch.allclose(e0, e1)  # a new view every epoch
    assert not torch.allclose(views.epoch(0, rep=1), e0)  # and every pass
    # another list holding some of the images (another run's split) draws the same views of them
    other = FreshViews(
        FeatureCache(shared_cache, num_workers=0), clip, "demo_digits", "another-list", paths[4:9], seed=1
    )
    assert torch.allclose(other.epoch(1), e1[4:9], atol=1e-6)
    # kept in the cache: a second run reads it; without the cache the same numbers are computed
    again = FeatureCache(shared_cache, num_workers=0)
    assert torch.equal(FreshViews(again, clip, "demo_digits", "sketch-views-test", paths, seed=1).epoch(0), e0)
    assert again.views == {"computed": 0, "read": 1}
    nocache = FeatureCache(tmp_path / "empty", num_workers=0)
    assert torch.allclose(
        FreshViews(nocache, clip, "demo_digits", "x", paths, seed=1, store=False).epoch(0), e0, atol=1e-6
    )
    assert not (tmp_path / "empty" / "features").exists()
    assert not torch.allclose(FreshViews(nocache, clip, "demo_digits", "x", paths, seed=2, store=False).epoch(0), e0)


def test_a_view_is_the_same_wherever_the_dataset_lies(clip, tmp_path, sketch):
    """The view's seed names an image by its path in the dataset folder, not by where the folder is."""
    import shutil

    root = Path(sketch[0]).parents[2]  # <cache>/data/demo_digits
    copy = tmp_path / "elsewhere" / "demo_digits"
    shutil.copytree(root / "sketch", copy / "sketch")
    paths = sketch[:6]
    moved = [str(copy / Path(p).relative_to(root)) for p in paths]
    cache = FeatureCache(tmp_path / "c", num_workers=0)
    here = FreshViews(cache, clip, "demo_digits", "a", paths, seed=1, store=False, root=root).epoch(3)
    there = FreshViews(cache, clip, "demo_digits", "a", moved, seed=1, store=False, root=copy).epoch(3)
    assert torch.allclose(here, there, atol=1e-6)
    # keyed by the full path
    elsewhere = FreshViews(cache, clip, "demo_digits", "a", moved, seed=1, store=False).epoch(3)
    assert not torch.allclose(here, elsewhere)


class EpochFake:
    """Target features that differ by epoch (an augmented view per epoch)."""

    def __init__(self, per_epoch):
        self.per_epoch, self.n = per_epoch, len(per_epoch[0])

    def epoch(self, epoch, rep=0):
        return self.per_epoch[epoch]


def test_dapl_pseudo_labels_come_from_the_view_the_target_term_sees(clip, tmp_path):
    names = ["one", "two", "three"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-shot class features, "a photo of a {class}." (the official naive prompts)
        zs = F.normalize(clip.encode_text([f"a photo of a {n}." for n in names], truncate=False), dim=-1)
    views = [F.normalize(zs[perm] + 0.05 * torch.randn(3, clip.embed_dim, generator=g), dim=-1)
             for perm in ([0, 1, 2], [2, 0, 1])]  # epoch 1 shows every image as another class
    m = DAPL(method_cfg("dapl", "n_ctx=2", "n_dom_ctx=2", "epochs=2", "tau=0.0", "batch_size=3", "target_batch_size=3"),
             clip, names, torch.device("cpu"), RunEnv(seed=1))
    src = torch.nn.functional.normalize(torch.randn(3, clip.embed_dim, generator=g), dim=-1)
    from promptdg_cli.data import Features

    train = Features(src, torch.tensor([0, 1, 2]), ["printed"] * 3, ["p0", "p1", "p2"])
    target = Features(views[0], torch.full((3,), -1), ["sketch"] * 3, ["s0", "s1", "s2"])
    (tmp_path / "s").mkdir()
    labels = []
    m.on_epoch = (lambda orig: lambda e, ctx: (orig(e, ctx), labels.append(m.pseudo.clone())))(m.on_epoch)
    m.fit(TrainData(train=train, target=target, train_views=Plain(src), target_views=EpochFake(views)),
          TrainContext(tmp_path, tmp_path / "s", "t", 1, torch.device("cpu")))
    expected = [(clip.logit_scale * v @ zs.T).argmax(-1) for v in views]
    assert [lab.tolist() for lab in labels] == [e.tolist() for e in expected] == [[0, 1, 2], [2, 0, 1]]


# --------------------------------------------------------------------- records and tables
def test_runs_record_their_protocol_and_opt_ins_and_collect_marks_them(run_cli):
    common = ("method.epochs=1", "method.n_ctx=2", "target=sketch")
    code, _, err, out_root = run_cli("train", "method=coop", *common)
    assert code == 0, err
    code, _, err, _ = run_cli("train", "method=coop", "method.augment=none", *common)
    assert code == 0, err
    recs = {tuple(r["opt_ins"]): r for r in results(out_root)}
    official, cheap = recs[()], recs[("augment=none",)]
    assert official["protocol_details"] == {"augment": "official", "aug_views": 0, "select": "last", "epochs": 1}
    views = official["data_used"]["augmented_views"]
    assert views["computed"] + views["read"] >= 2  # each epoch's views were encoded (or read: another test drew them)
    assert cheap["protocol_details"]["augment"] == "none" and cheap["data_used"]["augmented_views"] == {
        "computed": 0,
        "read": 0,
    }
    code, out, err, _ = run_cli("collect", str(out_root), tiny=False)
    assert code == 0, err
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| coop")]
    assert sorted(rows) == ["coop", "coop (augment=none*)"]
    assert "augment=none*: promptdg's cheaper protocol" in out


def test_select_target_test_is_an_opt_in_marked_in_the_table(run_cli):
    code, _, err, out_root = run_cli(
        "train",
        "method=dapl",
        "dataset.protocol=uda",
        "method.epochs=2",
        "method.n_ctx=2",
        "method.n_dom_ctx=2",
        "source=[printed]",
        "target=sketch",
        "method.augment=none",
        "method.select=target_test",
    )
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["opt_ins"] == ["augment=none", "select=target_test"]
    lines = [json.loads(line) for line in (Path(rec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [line["val_acc"] for line in lines if "val_acc" in line]  # the epochs were scored on the target's test set
    code, out, err, _ = run_cli("collect", str(out_root), tiny=False)
    assert (
        "dapl (augment=none*, select=target_test†)" in out
        and "select=target_test†: the epoch is selected on the target's test labels" in out
    )


def test_a_k_shot_run_records_the_images_it_drew(run_cli):
    code, _, err, out_root = run_cli(
        "train", "method=coop", "shots=2", "method.epochs=1", "method.n_ctx=2", "target=sketch", "method.augment=none"
    )
    assert code == 0, err
    (rec,) = results(out_root)
    drawn = json.loads((Path(rec["run_dir"]) / "splits" / "sketch" / "shots.json").read_text())
    assert drawn["sampler"] == "dassl" and len(drawn["train"]) == 2 * 10 and len(drawn["val"]) == 2 * 10
    assert all(
        not Path(p).is_absolute() and p.split("/")[0] in ("handwritten", "printed", "photo") for p in drawn["train"]
    )
    assert rec["data_used"]["shots_sampler"] == {"sketch": "dassl"}
