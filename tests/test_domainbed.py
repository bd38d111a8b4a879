"""DomainBed's protocol and ERM (facebookresearch/DomainBed at 7ab1d01), each against DomainBed's
algorithm written out here: the split (ImageFolder's order from torchvision itself, the md5 seed hash,
``np.random.RandomState(seed).shuffle``), the random hyper-parameters, the evaluation schedule, one
ERM step on a random ResNet-50 (a separately built torchvision model and ``torch.optim.Adam``), the
classifier backbone's weights, and the oracle rule's record and table mark."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from promptdg_cli.classifier import ClassifierBackbone
from promptdg_cli.data import Features
from promptdg_cli.domainbed import checkpoint_rounds, random_hparams, split_holdout
from promptdg_cli.errors import WeightsNotFound
from promptdg_cli.methods.base import RunEnv
from promptdg_cli.methods.erm import ERM
from promptdg_cli.protocols import TrainData
from promptdg_cli.training import TrainContext

from conftest import RESNET, method_cfg, results

CPU = torch.device("cpu")


def _cfg(model, pretrained, cache_dir=None):
    """A backbone config (kind classifier) at 32 px."""
    values = {
        "model": model,
        "pretrained": pretrained,
        "cache_dir": cache_dir,
        "image_size": 32,
        "precision": "fp32",
        "arch": "resnet",
    }
    return SimpleNamespace(**values, get=lambda k, d=None: values.get(k, d))


def seed_hash(*args) -> int:  # DomainBed lib/misc.py
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def domainbed_split(root: Path, trial_seed: int, holdout: float = 0.2) -> dict:
    """scripts/train.py's split of every environment: env_i in sorted folder order, ImageFolder's files,
    misc.split_dataset(env, int(len(env) * holdout), seed_hash(trial_seed, env_i)); (out, in) files."""
    from torchvision.datasets import ImageFolder

    envs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    out = {}
    for env_i, env in enumerate(envs):
        files = [path for path, _ in ImageFolder(str(root / env)).samples]
        keys = list(range(len(files)))
        np.random.RandomState(seed_hash(trial_seed, env_i)).shuffle(keys)
        n = int(len(files) * holdout)
        out[env] = ([files[k] for k in keys[:n]], [files[k] for k in keys[n:]])
    return out


def test_the_split_is_domainbeds_for_two_trial_seeds(tmp_path):
    """A DomainBed-layout dataset whose order differs from a naive listing: unsorted class names with
    capitals, numbers that sort as text, upper-case extensions, a nested folder, a non-image file."""
    root = tmp_path / "DS"
    names = ["img10.jpg", "img2.jpg", "IMG_1.JPG", "b.png", "a.PNG", "c.jpeg", "notes.txt"]
    for d in ("beta", "alpha", "Gamma"):
        for c in ("dog", "Cat", "ant"):
            for n in names[: 3 + len(d) % 4]:
                p = root / d / c / n
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4)).save(p, format="PNG") if not n.endswith(".txt") else p.write_text("x")
        (root / d / "dog" / "nested").mkdir()
        Image.new("RGB", (4, 4)).save(root / d / "dog" / "nested" / "z.jpg")
    domains = ["beta", "alpha", "Gamma"]  # a config's order: the environment index is the sorted one
    for trial in (0, 1):
        want = domainbed_split(root, trial)
        for d in domains:
            got = split_holdout(str(root / d), d, domains, trial, 0.2)
            assert got == want[d], (trial, d)
            assert len(got[0]) == int(0.2 * (len(got[0]) + len(got[1]))) > 0
    assert domainbed_split(root, 0)["alpha"] != domainbed_split(root, 1)["alpha"]  # the trial seed matters


@pytest.mark.parametrize("trial", [None, 0])
def test_a_run_records_the_held_out_images_and_tests_on_the_targets_in_part(run_cli, trial):
    """Zero-shot on the demo world (seed 1; trial_seed null = the seed, then 0): the run folder lists every
    domain's held-out images as DomainBed splits them, and the target is tested on its "in" part."""
    code, _, err, out_root = run_cli(
        "train", "method=zeroshot", "target=sketch", *([f"trial_seed={trial}"] if trial is not None else [])
    )
    assert code == 0, err
    (rec,) = results(out_root)
    run_dir = Path(rec["run_dir"])
    assert (f"_trial{trial}_" in run_dir.name) == (trial is not None)
    record = json.loads((run_dir / "splits" / "sketch" / "holdout.json").read_text())
    root = Path(os.environ["PROMPTDG_CACHE"]) / "data" / "demo_digits"
    want = domainbed_split(root, 1 if trial is None else trial)
    assert record["trial_seed"] == (1 if trial is None else trial) and set(record["domains"]) == {"sketch"}
    assert record["domains"]["sketch"]["out"] == [str(Path(p).relative_to(root)) for p in want["sketch"][0]]
    result = json.loads((run_dir / "splits" / "sketch" / "result.json").read_text())
    assert result["tests"]["sketch"]["n"] == len(want["sketch"][1])  # DomainBed reports env<test>_in_acc


def test_a_trained_run_records_every_source_domains_validation_images(run_cli):
    code, _, err, out_root = run_cli("train", "method=erm", "+debug=erm", "backbone.model=resnet18", "target=photo",
                                     "method.select=oracle", clip=False)
    assert code == 0, err
    (rec,) = results(out_root)
    record = json.loads((Path(rec["run_dir"]) / "splits" / "photo" / "holdout.json").read_text())
    want = domainbed_split(Path(os.environ["PROMPTDG_CACHE"]) / "data" / "demo_digits", 1)
    root = Path(os.environ["PROMPTDG_CACHE"]) / "data" / "demo_digits"
    for d in ("handwritten", "printed", "sketch", "photo"):
        assert record["domains"][d]["out"] == [str(Path(p).relative_to(root)) for p in want[d][0]]
        assert record["domains"][d]["role"] == ("target" if d == "photo" else "source")
    # the oracle rule: the last checkpoint, the test domain's held-out accuracy recorded, the row marked
    assert (
        rec["selection"] == "oracle"
        and set(rec["oracle_accuracy"]) == {"photo"}
        and rec["weights"] == {"kind": "random-init", "id": "random-init"}
    )
    code, out, err, _ = run_cli("collect", str(out_root), tiny=False)
    assert code == 0, err
    assert (
        "| erm (select=oracle‡) | resnet50_imagenet |" in out
        and "select=oracle‡: DomainBed's test-domain validation" in out
    )


def test_hparams_seed_draws_domainbeds_random_hyperparameters():
    """hparams_registry.py: RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), name)) per name."""
    seed = seed_hash(3, 1)

    def r(name):
        return np.random.RandomState(seed_hash(seed, name))

    want = {
        "lr": 10 ** r("lr").uniform(-5, -3.5),
        "weight_decay": 10 ** r("weight_decay").uniform(-6, -2),
        "batch_size": int(2 ** r("batch_size").uniform(3, 5.5)),
        "resnet_dropout": float(r("resnet_dropout").choice([0.0, 0.1, 0.5])),
    }
    assert random_hparams(3, 1, "pacs") == pytest.approx(want)
    # DomainNet's range
    assert random_hparams(3, 1, "domainnet")["batch_size"] == int(2 ** r("batch_size").uniform(3, 5))
    assert random_hparams(0, 1, "pacs") == {}  # hparams_seed 0: the defaults


def test_the_evaluation_schedule_is_domainbeds():
    """scripts/train.py evaluates after step s when s % checkpoint_freq == 0 or s == n_steps - 1."""
    for steps, freq in ((5001, 300), (5001, 1000), (7, 3), (1, 1)):
        want = [s for s in range(steps) if s % freq == 0 or s == steps - 1]
        assert list(np.cumsum(checkpoint_rounds(steps, freq)) - 1) == want


# --------------------------------------------------------------------- one ERM step
def test_one_erm_step_equals_adam_on_a_separately_built_resnet50(tmp_path):
    """A random ResNet-50 at 32 px, two source domains of 4 images, 2 draws each (augmentation off: the
    plain transform), one step; the same step on torchvision's resnet50 built here (BatchNorm in eval
    mode, fc = the method's initial head) with torch.optim.Adam."""
    from torchvision.models import resnet50

    from promptdg_cli.demo.world import generate_dataset

    root = generate_dataset(tmp_path / "world", per_class=1)
    torch.manual_seed(0)
    backbone = ClassifierBackbone.from_config(_cfg("resnet50", "random"))
    paths = [str(next((root / d / n).iterdir())) for d in ("photo", "sketch") for n in ("zero", "one", "two", "three")]
    y = torch.tensor([0, 1, 2, 3] * 2)
    train = Features(torch.zeros(8, 0), y, ["photo"] * 4 + ["sketch"] * 4, paths)
    cfg = method_cfg("erm", "steps=1", "checkpoint_freq=1", "batch_size=2", "augment=false")
    m = ERM(cfg, backbone, [f"c{i}" for i in range(10)], CPU, RunEnv(seed=1))
    head0 = {k: v.clone() for k, v in m.classifier.state_dict().items()}
    (tmp_path / "split").mkdir()
    m.fit(TrainData(train=train, val=train), TrainContext(tmp_path, tmp_path / "split", "t", 1, CPU))

    # the step's draws: 2 with replacement from each domain's rows (the loop's generator of period 0)
    g = torch.Generator().manual_seed(1 * 100003)
    idx = torch.cat([torch.randint(4, (2,), generator=g), 4 + torch.randint(4, (2,), generator=g)])
    tf = T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in idx.tolist()])
    ref = resnet50()
    ref.fc = torch.nn.Linear(2048, 10)
    ref.load_state_dict(
        {**{k: v for k, v in backbone.network.state_dict().items()}, **{f"fc.{k}": v for k, v in head0.items()}}
    )
    ref.train()
    for mod in ref.modules():  # DomainBed's freeze_bn
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    opt = torch.optim.Adam(ref.parameters(), lr=5e-5, weight_decay=0.0)
    loss = F.cross_entropy(ref(x), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    line = next(json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "epoch" in l)
    assert line["ce"] == pytest.approx(loss.item(), abs=1e-6)
    got = {f"featurizer.network.{k}": v for k, v in m.featurizer.network.state_dict().items()} | {
        f"fc.{k}": v for k, v in m.classifier.state_dict().items()}
    want = {f"featurizer.network.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")} | {
        k: v for k, v in ref.state_dict().items() if k.startswith("fc.")}
    assert got.keys() == want.keys()
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in got)
    moved = max(
        (want[f"featurizer.network.{k}"].double() - v.double()).abs().max().item()
        for k, v in backbone.network.state_dict().items()
    )
    assert worst <= 1e-7 and moved > 1e-5  # equal, and the step did move the featurizer (by up to lr)


# --------------------------------------------------------------------- the classifier backbone's weights
def test_the_classifier_backbone_loads_a_local_file_and_torch_hubs_folder(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    state = resnet18().state_dict()  # a torchvision state dict, fc included (dropped on loading)
    file = tmp_path / "weights.pth"
    torch.save(state, file)
    b = ClassifierBackbone.from_config(_cfg("resnet18", str(file)))
    assert all(torch.equal(v, state[k]) for k, v in b.network.state_dict().items())
    assert b.weights_id.startswith(f"file:{file.resolve()}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub's folder: $TORCH_HOME/hub/checkpoints
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    os.link(file, hub / "resnet18-f37072fd.pth")  # the file name of IMAGENET1K_V1's URL
    b = ClassifierBackbone.from_config(_cfg("resnet18", "IMAGENET1K_V1"))
    assert all(torch.equal(v, state[k]) for k, v in b.network.state_dict().items())
    assert b.weights_id == "torchvision:resnet18.IMAGENET1K_V1 (resnet18-f37072fd.pth)"
    x = torch.rand(2, 3, 32, 32)
    f = b.featurizer()
    assert torch.equal(f.eval()(x), b.features(x)) and all(p.requires_grad for p in f.parameters())
    f.train()
    assert all(not mod.training for mod in f.modules() if isinstance(mod, torch.nn.BatchNorm2d))  # frozen BatchNorm


def test_missing_weights_fail_clearly_offline(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound) as e:
        ClassifierBackbone.from_config(_cfg("resnet50", "IMAGENET1K_V1"))
    where = str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    assert where in str(e.value) and "backbone.pretrained=/path/to/resnet50-0676ba61.pth" in str(e.value)
    with pytest.raises(WeightsNotFound, match="no file there"):
        ClassifierBackbone.from_config(_cfg("resnet50", str(tmp_path / "nothing.pth")))
    with pytest.raises(Exception, match="Valid: IMAGENET1K_V1, IMAGENET1K_V2"):
        ClassifierBackbone.from_config(_cfg("resnet50", "IMAGENET"))
    code, out, err, _ = run_cli("train", "method=erm", "backbone=resnet50_imagenet", "target=sketch", clip=False)
    assert code != 0 and where in err and "Traceback" not in err


def test_methods_refuse_the_wrong_kind_of_backbone(run_cli):
    code, _, err, _ = run_cli("train", "method=coop", *RESNET, clip=False)
    assert code != 0 and "method=coop needs a CLIP backbone" in err and "backbone=resnet50_imagenet" in err
    code, _, err, _ = run_cli("train", "method=erm", "target=sketch")
    assert code != 0 and "method=erm needs an ImageNet classifier" in err and "resnet50_imagenet" in err
