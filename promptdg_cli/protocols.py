"""The data protocols: which images a run trains on, selects on and tests on.

Each protocol is an object built for one run: ``splits()`` lists its splits (one model each),
``train_data(split)`` is the typed :class:`TrainData` a method's ``fit`` gets, and
``test_sets(split)`` the labelled sets the runner tests on. The target's labels never reach
``train_data``.

* :class:`DG` (leave-one-domain-out), DomainBed's protocol (``domainbed.domainbed_parts``): every domain
  is split by DomainBed's rule (``trial_seed``, ``dataset.val_fraction``); the sources train on their
  "in" part and select on their held-out "out" part, the target is tested on its "in" part (what
  DomainBed reports) and its "out" part is the test-domain validation set of DomainBed's oracle
  rule. ``shots=k`` draws k images per class of the source training split, then min(k, 4) of the
  validation split, as CoOp draws (``shots.py``).
* :class:`UDA`: labelled sources, the target domain unlabelled in training, tested on the target;
  any pair, several sources, every pair into a target, or every ordered pair. The sources are used
  whole, as DAPL's official trainer does; ``method.source_holdout=true`` holds 20 % out for
  validation (promptdg's protocol, which ``method.select=val`` needs).
* :class:`SourceFree` (PromptStyler): one model trained on no images, tested on every domain.
* :class:`FewShot`: CoOp's split files, k shots per class drawn as CoOp draws them, the whole test
  split for the test.

What a frozen-encoder method sees of its training images in each epoch (the official augmentation,
K cached views, or the plain features) is ``TrainData.train_views`` / ``target_views``
(``views.py``, chosen by ``method.augment``).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Type, TypeVar

import numpy as np
import torch

from .data import FeatureCache, Features, class_names, dataset_dir
from .domainbed import domainbed_parts
from .errors import ConfigError
from .fewshot import class_subset, dataset_root, few_shot_splits, read_split, val_is_test
from .shots import dassl_draw, drawn_record
from .views import NONE, ConcatViews, EpochFeatures, Plain, epoch_features

PAIR_ARROW = "→"  # as in the tables: "art→clipart"
SOURCE_FREE = "all"  # the split label of a model trained on no domain
P = TypeVar("P", bound="Protocol")  # attach() returns the protocol it was given


@dataclass
class Split:
    """One split: train/validate on ``sources``, test on ``tests`` (by default the ``target`` alone)."""

    target: str
    sources: List[str]
    tests: List[str]
    key: str  # the record's column: the target (DG) or "src+src→target" (UDA)

    # (written out, not generated: ``tests`` and ``key`` may be left out, and are set all the same)
    def __init__(self, target: str, sources: List[str], tests: Optional[List[str]] = None, key: Optional[str] = None):
        self.target, self.sources = target, sources
        self.tests = [target] if tests is None else tests
        self.key = target if key is None else key

    @property
    def dirname(self) -> str:
        """Folder of this split under ``splits/`` (no arrow in file names)."""
        return self.key.replace(PAIR_ARROW, "_to_")


@dataclass
class TrainData:
    """What a method's ``fit`` gets: labelled source training and validation features, and in UDA the
    target's features without labels (y = -1); ``*_views``: what each epoch sees of them
    (``views.py``: the official augmentation, K cached views or the plain features); ``drawn``: with
    ``shots=k``, the drawn images (paths relative to the dataset folder, in draw order) and the sampler."""

    train: Optional[Features] = None
    val: Optional[Features] = None
    target: Optional[Features] = None
    train_views: Optional[EpochFeatures] = None
    target_views: Optional[EpochFeatures] = None
    drawn: Optional[dict] = None

    def shots_per_class(self, classnames: Sequence[str]) -> Dict[str, int]:
        """Training images per class as drawn (``shots=k``: k, or fewer where a class has fewer)."""
        assert self.train is not None  # (asked of a method that trains)
        counts = torch.bincount(self.train.y, minlength=len(classnames)).tolist()
        return {name: int(n) for name, n in zip(classnames, counts)}


# --------------------------------------------------------------------- helpers
def check_domains(dataset_cfg, target, source) -> List[str]:
    domains = list(dataset_cfg.domains)
    for key, names in (("target", [target] if target else []), ("source", list(source or []))):
        bad = [d for d in names if d not in domains]
        if bad:
            raise ConfigError(f"{key}={bad[0]!r} is not a domain of dataset={dataset_cfg.name}. Valid: {domains}")
    return domains


def train_val_indices(n: int, seed: int, domain: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of one domain's n images; depends on the seed and domain name only."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def unlabelled(f: Features) -> Features:
    """The same images without their labels (y = -1): what UDA training may see of the target."""
    return Features(f.x, torch.full_like(f.y, -1), f.domain, f.paths)


def dg_splits(dataset_cfg, target: Optional[str], source: Optional[Sequence[str]]) -> List[Split]:
    """Leave-one-domain-out: ``target`` (or every domain in turn) against ``source`` (default: the rest)."""
    domains = check_domains(dataset_cfg, target, source)
    out = []
    for t in [target] if target else domains:
        sources = [d for d in (source or domains) if d != t]
        if not sources:
            raise ConfigError(f"target={t!r} leaves no source domain (source={list(source or [])})")
        out.append(Split(target=t, sources=sources))
    return out


def uda_splits(dataset_cfg, target: Optional[str], source: Optional[Sequence[str]]) -> List[Split]:
    """``source=[a, b] target=t``: one split, a+b→t; ``target=t`` alone: every single-source pair into
    t; ``source=[a]`` alone: a→t for every other t; neither: every ordered single-source pair."""
    source = list(source or [])
    domains = check_domains(dataset_cfg, target, source)
    if target and target in source:
        raise ConfigError(f"target={target!r} is also in source={source}: in UDA the target domain is unlabelled")
    if target and source:
        groups = [(source, target)]
    elif target:
        groups = [([s], target) for s in domains if s != target]
    elif source:
        groups = [(source, t) for t in domains if t not in source]
    else:
        groups = [([s], t) for s in domains for t in domains if s != t]
    if not groups:
        raise ConfigError(f"source={source} leaves no target domain in dataset={dataset_cfg.name} ({domains})")
    return [Split(target=t, sources=list(g), key="+".join(g) + PAIR_ARROW + t) for g, t in groups]


# --------------------------------------------------------------------- the protocols
@dataclass(frozen=True)
class RunSpec:
    """What a protocol needs of a run, resolved once from the run config (:meth:`of`)."""

    seed: int = 1
    shots: Optional[int] = None
    target: Optional[str] = None
    source: Optional[List[str]] = None
    trial_seed: Optional[int] = None  # DomainBed's (DG split); None: the seed
    method: str = ""  # the method's name (for messages)
    augment: str = NONE  # what a frozen-encoder method sees of its images per epoch (views.py)
    aug_views: int = 0
    augment_cache: bool = True
    source_holdout: bool = False  # UDA: hold 20 % of the sources out
    select: str = "last"

    @classmethod
    def of(cls, cfg) -> "RunSpec":
        m = cfg.get("method") or {}
        return cls(
            seed=int(cfg.get("seed", 1)),
            shots=cfg.get("shots"),
            target=cfg.get("target"),
            source=list(cfg.source) if cfg.get("source") else None,
            trial_seed=cfg.get("trial_seed"),
            method=str(m.get("name", "")),
            augment=str(m.get("augment", NONE)),
            aug_views=int(m.get("aug_views", 0) or 0),
            augment_cache=bool(cfg.get("augment_cache", True)),
            source_holdout=bool(m.get("source_holdout", False)),
            select=str(m.get("select", "last")),
        )


class Protocol:
    name = ""

    def __init__(self, dataset, spec: RunSpec, cache: Optional[FeatureCache] = None, backbone=None):
        self.dataset, self.spec, self.cache, self.backbone = dataset, spec, cache, backbone
        self.seed, self.shots = spec.seed, spec.shots
        self.augment, self.aug_views, self.augment_cache = spec.augment, spec.aug_views, spec.augment_cache

    def attach(self: P, cache: FeatureCache, backbone) -> P:
        self.cache, self.backbone = cache, backbone
        return self

    @property
    def features(self) -> FeatureCache:
        assert self.cache is not None, "attach() a feature cache first"  # (the runner does, before any data)
        return self.cache

    def splits(self) -> List[Split]:
        raise NotImplementedError

    def classnames(self) -> List[str]:
        return class_names(self.dataset)

    def check_data(self) -> None:
        """Fail before any model is loaded if the data is missing (generating the demo world)."""
        dataset_dir(self.dataset)

    def train_data(self, split: Split) -> TrainData:
        raise NotImplementedError

    def test_set(self, domain: str) -> Features:
        """The labelled images a tested domain is scored on: the whole domain (DG: its "in" part)."""
        return self.features.domain_features(self.backbone, self.dataset, domain)

    def test_sets(self, split: Split) -> Dict[str, Features]:
        return {d: self.test_set(d) for d in split.tests}

    def test_subset(self):
        """Class indices the test set covers (ImageNet-A/R: 200 of 1000), else None."""
        return None

    def oracle_sets(self, split: Split) -> Dict[str, Features]:
        """The test domains' held-out parts (DomainBed's oracle rule); none outside the DG protocol."""
        return {}

    def holdout_record(self, split: Split, sources: bool = True) -> Optional[dict]:
        """What the run folder records of a split's held-out images (DG); None: nothing."""
        return None

    def _views(self, base: Features, name: str) -> EpochFeatures:
        """What each epoch sees of ``base`` (a list cached as ``name``) under ``method.augment``."""
        if self.augment == NONE or not len(base):
            return Plain(base.x)
        return epoch_features(self.augment, base, self.cache, self.backbone, self.dataset.name, name, self.seed,
                              self.aug_views, self.augment_cache, root=self.root())

    def root(self) -> Path:
        """The dataset's folder (what the images' paths are relative to)."""
        return dataset_dir(self.dataset)

    # the source domains' train / val parts, shots and views
    def _source(self, split: Split, holdout: bool = True) -> TrainData:
        train, val, views = [], [], []
        for d in split.sources:
            f = self.features.domain_features(self.backbone, self.dataset, d)
            if holdout:
                tr, va = self.holdout(f, d)
                train.append(f.subset(tr))
                val.append(f.subset(va))
            else:  # the whole domain (DAPL's official trainer)
                train.append(f)
            views.append((train[-1], f"{d}-train" if holdout else d))
        data = TrainData(train=Features.cat(train), val=Features.cat(val) if holdout else None)
        if self.shots:  # k shots per class of the source training data, then min(k, 4) of the validation data
            assert data.train is not None  # (set just above)
            draw = dassl_draw(
                data.train.y.tolist(), None if data.val is None else data.val.y.tolist(), self.shots, self.seed
            )
            data.train = data.train.subset(draw.train)
            data.val = None if data.val is None else data.val.subset(draw.val)
            data.drawn = drawn_record(draw, data.train, data.val, dataset_dir(self.dataset))
            views = [(data.train, f"{split.dirname}-{self.shots}shot-train")]
        data.train_views = ConcatViews([self._views(f, name) for f, name in views])
        return data

    def holdout(self, f: Features, domain: str):
        """(train rows, validation rows) of a source domain's features."""
        return train_val_indices(len(f), self.seed, domain, self.dataset.val_fraction)


class DG(Protocol):
    name = "dg"
    _memo: Dict[str, tuple]  # domain -> _parts(domain), made on first use

    @property
    def trial_seed(self) -> int:
        """DomainBed's trial_seed (the split); null in the config: the run's seed."""
        t = self.spec.trial_seed
        return self.seed if t is None else int(t)

    def splits(self) -> List[Split]:
        return dg_splits(self.dataset, self.spec.target, self.spec.source)

    def train_data(self, split: Split) -> TrainData:
        return self._source(split)

    def _parts(self, domain: str):
        """(features, in rows, out rows, record) of a domain, computed once per run."""
        if domain not in self.__dict__.setdefault("_memo", {}):
            f = self.features.domain_features(self.backbone, self.dataset, domain)
            self._memo[domain] = (f, *domainbed_parts(f, self.dataset, domain, self.trial_seed))
        return self._memo[domain]

    def holdout(self, f: Features, domain: str):
        _, rows_in, rows_out, _ = self._parts(domain)
        return rows_in, rows_out

    def test_set(self, domain: str) -> Features:
        """A tested domain's "in" part (DomainBed reports ``env<i>_in_acc`` of the test environment)."""
        f, rows_in, _, _ = self._parts(domain)
        return f.subset(rows_in)

    def oracle_sets(self, split: Split) -> Dict[str, Features]:
        """Each tested domain's held-out part: DomainBed's test-domain validation set (the oracle rule)."""
        return {d: self._parts(d)[0].subset(self._parts(d)[2]) for d in split.tests}

    def holdout_record(self, split: Split, sources: bool = True) -> dict:
        """What the run folder records of the split: the held-out images (relative paths) of every
        source domain (``sources``: a method that trains) and tested domain."""
        domains = (split.sources if sources else []) + split.tests
        parts = {d: self._parts(d)[3] | {"role": "source" if d in split.sources else "target"} for d in domains}
        return {
            "rule": "DomainBed scripts/train.py: "
            "split_dataset(env, int(len(env) * holdout_fraction), seed_hash(trial_seed, env_i))",
            "trial_seed": self.trial_seed,
            "holdout_fraction": float(self.dataset.val_fraction),
            "domains": parts,
        }


class UDA(Protocol):

    name = "uda"

    def splits(self) -> List[Split]:
        return uda_splits(self.dataset, self.spec.target, self.spec.source)

    def train_data(self, split: Split) -> TrainData:
        data = self._source(split, holdout=self.spec.source_holdout)
        test = self.features.domain_features(self.backbone, self.dataset, split.target)
        data.target = unlabelled(test)
        data.target_views = self._views(data.target, split.target)
        return data

    def test_sets(self, split: Split) -> Dict[str, Features]:
        return {split.key: self.test_set(split.target)}


class SourceFree(Protocol):
    name = "source_free"

    def splits(self) -> List[Split]:
        if self.spec.source:
            raise ConfigError(
                f"source={self.spec.source} has no meaning for method={self.spec.method}: it is source-free and "
                f"trains on no images. Drop source= (target= only chooses which domains are tested; default: all of "
                f"{list(self.dataset.domains)})."
            )
        domains = check_domains(self.dataset, self.spec.target, None)
        return [Split(target=SOURCE_FREE, sources=[], tests=[self.spec.target] if self.spec.target else domains)]

    def train_data(self, split: Split) -> TrainData:
        return TrainData()  # no image at all: the method trains before any image is read


class FewShot(Protocol):
    name = "fewshot"

    def test_subset(self):
        return class_subset(self.dataset)  # ImageNet-A/R: predict among their 200 classes

    def splits(self) -> List[Split]:
        return [Split(target=self.dataset.name, sources=[], key=self.dataset.name)]

    def classnames(self) -> List[str]:
        return list(read_split(self.dataset, "test")[2])  # (the split file: read before any model)

    def check_data(self) -> None:
        self.classnames()

    def root(self) -> Path:
        return dataset_root(self.dataset)

    def train_data(self, split: Split) -> TrainData:
        s = few_shot_splits(self.dataset, self.shots, self.seed)
        # cached per image list: the whole test split once, each k-shot draw (a few images) on its own
        tag = f"{self.shots}shot-seed{self.seed}" if self.shots else "all"
        train = self.features.list_features(self.backbone, self.dataset.name, f"train-{tag}", *s["train"])
        val = (
            None
            if s["val"] is None
            else self.features.list_features(self.backbone, self.dataset.name, f"val-{tag}", *s["val"])
        )
        data = TrainData(train=train, val=val, train_views=self._views(train, f"train-{tag}"))
        if s["draw"] is not None:
            data.drawn = drawn_record(s["draw"], train, val, dataset_root(self.dataset))
        return data

    def test_sets(self, split: Split) -> Dict[str, Features]:
        paths, labels, _ = read_split(self.dataset, "test")
        return {split.key: self.features.list_features(self.backbone, self.dataset.name, "test", paths, labels)}


# the protocols of datasets with domains, by name (a method's own, else the dataset's)
DOMAIN_PROTOCOLS: Dict[str, Type[Protocol]] = {"dg": DG, "uda": UDA, "source_free": SourceFree}


def protocol_for(cfg, method_cls) -> Protocol:
    """The run's protocol, given the typed parts it needs (the dataset's config and a :class:`RunSpec`):
    a few-shot dataset's, else the method's own (DAPL: uda; PromptStyler: source-free) or the dataset's.
    A combination that cannot work fails here, before anything loads."""
    fewshot = str(cfg.dataset.protocol) == "fewshot"
    if fewshot:
        if method_cls.protocol in ("uda", "source_free") or cfg.target or cfg.source:
            raise ConfigError(
                f"dataset={cfg.dataset.name} follows the few-shot protocol (train/val/test split files, no domains): "
                f"method={cfg.method.name} needs domains, and target=/source= do not apply. "
                f"Few-shot methods: zeroshot, linear_probe, coop, dapt."
            )
        protocol: Protocol = FewShot(cfg.dataset, RunSpec.of(cfg))
    else:
        protocol = DOMAIN_PROTOCOLS[method_cls.protocol or str(cfg.dataset.protocol)](cfg.dataset, RunSpec.of(cfg))
    check_selection(protocol)
    return protocol


def check_selection(protocol: Protocol) -> None:
    """Model selection and augmentation that the run's data cannot give: a clear error before anything loads."""
    spec, dataset = protocol.spec, protocol.dataset
    if spec.select == "val":
        why = None
        if isinstance(protocol, FewShot) and val_is_test(dataset):
            why = (
                f"dataset={dataset.name}'s val split is its test split ({dataset.split_paths.get('val')}), so it has "
                f"no validation data: selecting on it would select on test labels. The official code keeps the last "
                f"epoch: method.select=last"
            )
        elif isinstance(protocol, UDA) and not spec.source_holdout:
            why = ("the sources are used whole for training (method.source_holdout=false, as the official trainer). "
                   "method.source_holdout=true holds 20 % of each source out for validation; or method.select=last")
        elif isinstance(protocol, SourceFree):
            why = "a source-free method trains on no images: method.select=last"
        if why:
            raise ConfigError(f"method.select=val needs validation data, and this run has none: {why}")
    if spec.select == "target_test" and isinstance(protocol, SourceFree):
        raise ConfigError("method.select=target_test needs one target domain; a source-free run tests every domain")
    if spec.augment == "views" and not spec.aug_views:
        raise ConfigError("method.augment=views needs method.aug_views=K (K >= 1 views per image)")


def protocol_name(cfg, method_cls) -> str:
    """The protocol a record names: fewshot, uda, or the dataset's (a source-free run is ``dg`` with
    ``source_free: true`` in its record)."""
    if str(cfg.dataset.protocol) == "fewshot":
        return "fewshot"
    return "uda" if method_cls.protocol == "uda" else str(cfg.dataset.protocol)
