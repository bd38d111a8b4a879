"""DomainBed's protocol, as facts read from its files (Gulrajani & Lopez-Paz, "In Search of Lost Domain
Generalization", ICLR 2021; github.com/facebookresearch/DomainBed at 7ab1d01, the last commit before
ERM++ made an AugMix ResNet-50 the default). Written from the algorithms, not copied:

* ``seed_hash``: ``lib/misc.py`` (md5 of ``str(args)``, modulo 2**31);
* the split (``split_holdout``): ``scripts/train.py`` splits environment ``env_i`` with
  ``misc.split_dataset(env, int(len(env) * holdout_fraction), misc.seed_hash(trial_seed, env_i))``:
  ``np.random.RandomState(seed).shuffle`` of ``range(len(env))``; the first ``n`` keys are the
  held-out ("out") part, the rest the training ("in") part. An environment is a torchvision
  ``ImageFolder`` over one domain folder (``datasets.py``: ``MultipleEnvironmentImageFolder``), and
  the environments are the dataset's domain folders sorted by name, so ``env_i`` is a domain's
  position in that order and the keys index ImageFolder's file order (``imagefolder_files``);
  ``domainbed_parts`` is that split as rows of a domain's features;
* the transforms (``datasets.py``): ``augment_transform`` for training domains, ``transform`` for
  every evaluation;
* the schedule (``scripts/train.py``): an evaluation after step 0, every ``CHECKPOINT_FREQ`` steps
  and after the last of ``N_STEPS`` steps (``checkpoint_rounds``);
* ``random_hparams``: ``hparams_registry.py``'s draw for ERM (``hparams_seed`` 0: the defaults).

Torch-free, so that a protocol and a config can use it before torch is imported.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from .data import Features

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder lists (case-insensitive)
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # datasets.py's Normalize
# promptdg dataset config -> DomainBed's dataset class (hparams_registry.py treats DomainNet apart)
DOMAINBED_NAMES = {"pacs": "PACS", "vlcs": "VLCS", "officehome": "OfficeHome", "terra_incognita": "TerraIncognita",
                   "domainnet": "DomainNet"}


def seed_hash(*args) -> int:
    """DomainBed's ``misc.seed_hash``: an integer seed from any arguments."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def imagefolder_files(domain_dir: str) -> List[str]:
    """The files of one environment in ImageFolder's order: class folders sorted by name, each walked
    with ``sorted(os.walk(..., followlinks=True))`` and its file names sorted."""
    classes = sorted(e.name for e in os.scandir(domain_dir) if e.is_dir())
    files = []
    for c in classes:
        for root, _, names in sorted(os.walk(os.path.join(domain_dir, c), followlinks=True)):
            files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGEFOLDER_EXTENSIONS)]
    return files


def env_index(domain: str, domains: Sequence[str]) -> int:
    """A domain's environment index: its position among the dataset's domain folders sorted by name."""
    return sorted(domains).index(domain)


def split_holdout(domain_dir: str, domain: str, domains: Sequence[str], trial_seed: int,
                  holdout_fraction: float) -> Tuple[List[str], List[str]]:
    """(out, in): the held-out and the training files of one environment, each in DomainBed's key order."""
    files = imagefolder_files(domain_dir)
    keys = list(range(len(files)))
    np.random.RandomState(seed_hash(trial_seed, env_index(domain, domains))).shuffle(keys)
    n_out = int(len(files) * holdout_fraction)
    return [files[k] for k in keys[:n_out]], [files[k] for k in keys[n_out:]]


def domainbed_parts(f: Features, dataset_cfg, domain: str, trial_seed: int) -> tuple[list, list, dict]:
    """DomainBed's split of one domain (``split_holdout``: ImageFolder's order, the md5
    seed of (trial_seed, environment index), ``RandomState.shuffle``, the first ``val_fraction`` held
    out) as rows of ``f``: (in rows, out rows, the record of the split). A file ImageFolder lists
    that ``f`` lacks (unreadable, or an extension promptdg does not read) is left out of both parts
    and counted; a file ImageFolder does not list is in neither part."""
    from .data import dataset_dir  # (data imports torch; this module stays torch-free)

    root = dataset_dir(dataset_cfg)
    out_files, in_files = split_holdout(str(root / domain), domain, list(dataset_cfg.domains), int(trial_seed),
                                        float(dataset_cfg.val_fraction))
    row = {p: i for i, p in enumerate(f.paths)}
    rows_in, rows_out = [row[p] for p in in_files if p in row], [row[p] for p in out_files if p in row]
    record = {"out": [str(Path(p).relative_to(root)) for p in out_files if p in row], "n_in": len(rows_in),
              "missing": len(in_files) + len(out_files) - len(rows_in) - len(rows_out)}
    return rows_in, rows_out, record


def checkpoint_rounds(steps: int, freq: int) -> List[int]:
    """Steps between evaluations: one after step 0, then every ``freq`` steps, and after the last
    step (5,001 steps, freq 300: [1, 300 x 16, 200])."""
    points = [s for s in range(steps) if s % freq == 0 or s == steps - 1]
    return [b - a for a, b in zip([-1] + points, points)]


def random_hparams(hparams_seed: int, trial_seed: int, dataset: str) -> Dict[str, float]:
    """ERM's hyper-parameters of DomainBed's sweep: ``hparams_seed`` 0 draws nothing (empty: the config's
    defaults apply); otherwise each one is drawn from ``RandomState(seed_hash(seed_hash(hparams_seed,
    trial_seed), name))`` with hparams_registry.py's distribution for a 224-px dataset."""
    if not hparams_seed:
        return {}
    seed = seed_hash(hparams_seed, trial_seed)

    def draw(name, fn):
        return fn(np.random.RandomState(seed_hash(seed, name)))

    top = 5.0 if DOMAINBED_NAMES.get(dataset) == "DomainNet" else 5.5
    return {"resnet_dropout": float(draw("resnet_dropout", lambda r: r.choice([0.0, 0.1, 0.5]))),
            "lr": float(draw("lr", lambda r: 10 ** r.uniform(-5, -3.5))),
            "weight_decay": float(draw("weight_decay", lambda r: 10 ** r.uniform(-6, -2))),
            "batch_size": int(draw("batch_size", lambda r: int(2 ** r.uniform(3, top))))}
