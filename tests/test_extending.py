"""Extending promptdg from outside the package: a dataset with one YAML in the user's config
directory, a method with one Python file in the user's package (README: "Extending promptdg")."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import TINY  # (less its demo-world size: the dataset here is the user's own)

METHOD_FILE = '''
"""Nearest class mean of the labelled source features, refined with SGD on a linear head."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptdg_cli.schema import MethodConfig, num
from promptdg_cli.methods.base import Method
from promptdg_cli.training import Term, shuffled_batches


@dataclass
class LinearHeadConfig(MethodConfig):
    lr: float = num(gt=0.0)
    epochs: int = num(ge=1)


class LinearHead(Method):
    Config = LinearHeadConfig

    def fit(self, data, ctx):
        self.x, self.y = data.train.x.to(self.device), data.train.y.to(self.device)
        self.val = data.val
        means = torch.zeros(len(self.classnames), self.x.shape[1]).index_add_(0, self.y.cpu(), self.x.cpu())
        self.weight = torch.nn.Parameter(F.normalize(means, dim=-1).to(self.device))
        ctx.train(self)

    def parameters_to_train(self):
        return [self.weight]

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.cfg.lr)

    def epoch_batches(self, epoch, g):
        return shuffled_batches(len(self.y), self.cfg.batch_size, g)

    def batch_loss(self, idx, info):
        logits = 10 * self.x[idx] @ F.normalize(self.weight, dim=-1).T
        return [Term("loss", F.cross_entropy(logits, self.y[idx]), len(idx))]

    @torch.no_grad()
    def logits(self, x):
        return x.to(self.device) @ F.normalize(self.weight, dim=-1).T

    def state_dict(self):
        return {"weight": self.weight.detach()}

    def load_state_dict(self, state):
        self.weight = torch.nn.Parameter(state["weight"].to(self.device))
'''

METHOD_YAML = """
_target_: mylab.linear_head.LinearHead
name: linear_head
variant: ""
lr: 0.5
epochs: 2
batch_size: 16
"""

DATASET_YAML = """
name: three_digits
folder: three_digits
domains: [printed, sketch, photo]
classes: {zero: zero, one: one, two: two, three: three, four: four, five: five, six: six, seven: seven,
  eight: eight, nine: nine}
"""


def _setup(tmp_path: Path):
    from promptdg_cli.demo.world import generate_dataset

    pkg = tmp_path / "src" / "mylab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "linear_head.py").write_text(textwrap.dedent(METHOD_FILE))
    conf = tmp_path / "myconf"
    (conf / "method").mkdir(parents=True)
    (conf / "dataset").mkdir()
    (conf / "method" / "linear_head.yaml").write_text(METHOD_YAML)
    (conf / "dataset" / "three_digits.yaml").write_text(DATASET_YAML)
    generate_dataset(tmp_path / "data" / "three_digits", per_class=4)
    return conf


def _run(tmp_path, random_clip, *args):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), os.environ.get("PYTHONPATH", "")]),
        "PROMPTDG_CACHE": str(tmp_path / "cache"),
        "PROMPTDG_OUT": str(tmp_path / "out"),
        "PROMPTDG_DATA": str(tmp_path / "data"),
    }
    cmd = [sys.executable, "-m", "promptdg_cli", "train", "--config-dir", str(tmp_path / "myconf"), *TINY[1:],
           f"backbone.pretrained={random_clip}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_a_method_and_a_dataset_from_outside_the_package(tmp_path, random_clip):
    _setup(tmp_path)
    out = _run(tmp_path, random_clip, "method=linear_head", "dataset=three_digits", "target=sketch")
    assert out.returncode == 0, out.stderr[-3000:]
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results.json")]
    assert rec["status"] == "finished" and rec["method"] == "linear_head" and rec["dataset"] == "three_digits"
    assert rec["source_domains"] == {"sketch": ["printed", "photo"]}  # the user's domains, not the demo's four
    epochs = [
        json.loads(l)["epoch"] for l in Path(rec["run_dir"], "metrics.jsonl").read_text().splitlines() if '"epoch"' in l
    ]
    assert epochs == [0, 1]  # the training loop ran the method's epochs


def test_the_outside_methods_own_schema_checks_its_values(tmp_path, random_clip):
    _setup(tmp_path)
    out = _run(tmp_path, random_clip, "method=linear_head", "dataset=three_digits", "method.lr=-2")
    assert out.returncode == 2 and "method.lr=-2" in out.stderr and "> 0" in out.stderr
    out = _run(tmp_path, random_clip, "method=linear_head", "dataset=three_digits", "+method.lrr=2")
    assert out.returncode == 2 and "lrr" in out.stderr
