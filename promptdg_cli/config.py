"""The run config: top-level schema, config registration, range checks, resolvers and the run key.

``register_configs()`` is the one place that stores schemas in Hydra's ConfigStore: the top-level
``RunConfig`` (so ``dataset`` and ``backbone`` are typed by their dataclasses), every built-in
method's schema under ``schema/method/<name>`` (each ``conf/method/<name>.yaml`` lists it first in
its defaults) and the submitit launcher's schemas under ``schema/launcher/<name>``. Torch-free: a
config error answers before any heavy library is imported.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, cast

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from . import conf_dir  # noqa: F401  (re-exported: callers of config use it)
from .errors import ConfigError, UserError  # noqa: F401  (UserError: re-exported for callers of config)
from .schema import METHOD_SCHEMAS, BackboneConfig, DatasetConfig


@dataclass
class RunConfig:
    method: Any = MISSING  # typed by the method's own schema (conf/method/<name>.yaml)
    dataset: DatasetConfig = MISSING
    backbone: BackboneConfig = MISSING
    seed: int = 1
    # DG: the held-out test domain; null runs leave-one-domain-out for every domain in turn.
    target: Optional[str] = None
    # Source domains; null = every domain but the target (DG).
    source: Optional[List[str]] = None
    # k images per class drawn (seeded) from the training split: the few-shot protocol, or k shots of
    # the source training data on DG data; null = all (the few-shot val split then has min(k, 4) per class)
    shots: Optional[int] = field(default=None, metadata={"range": {"ge": 1}})
    # DomainBed's trial_seed (scripts/train.py): seeds the split of every domain in the DG protocol and,
    # with method.hparams_seed, DomainBed's random hyper-parameters; null: the run's seed
    trial_seed: Optional[int] = field(default=None, metadata={"range": {"ge": 0}})
    data_root: str = MISSING
    cache_root: str = MISSING
    out_root: str = "outputs"
    # auto | cpu | cuda | cuda:N (under torchrun cuda:N is the job's first GPU on a node: rank r uses cuda:N+r)
    device: str = "auto"
    # image-loading workers (feature extraction, DAPT's and ERM's image batches): a number, or auto: the CPUs
    # the job has (CPU affinity, SLURM_CPUS_PER_TASK, shared by a node's torchrun ranks) minus one, at most 32;
    # the record's data_loading says what was used
    num_workers: Any = "auto"
    # float32 matmuls and cuDNN convolutions: auto (high on CUDA: TF32 tensor cores, PyTorch's advice for
    # Ampere and later; highest on the CPU: plain fp32), highest, high or medium; recorded, and part of the
    # feature-cache key (GPU TF32 features and CPU fp32 features never share a file)
    matmul_precision: str = field(default="auto", metadata={"choices": ["auto", "highest", "high", "medium"]})
    # method.augment=official: keep each epoch's augmented view features in the cache, shared by every run that
    # draws the same view (views.py); false: encode them in the run and keep nothing (results are the same)
    augment_cache: bool = True
    force: bool = False  # rerun even when a finished results.json with this config exists
    run_dir: Optional[str] = None  # eval only: a finished run whose models are re-evaluated
    extra: Any = field(default_factory=dict)  # free-form notes, recorded but not hashed
    logger: Any = None  # trackers (conf/logger/, promptdg_cli/tracking): name -> settings; null: none; not hashed


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="schema/method", name=name, node=schema)
    _register_launchers(cs)


# promptdg's launchers and the plugin's names for them
LAUNCHER_ALIASES = {"submitit_local": "local", "submitit_slurm": "slurm"}


def _register_launchers(cs: ConfigStore) -> None:
    """``hydra/launcher=submitit_local`` / ``submitit_slurm`` (hydra-submitit-launcher's own names)
    become promptdg's ``local`` / ``slurm`` (conf/hydra/launcher/): the same defaults and job names.

    The plugin's own nodes name the job ``${hydra.job.name}``, which promptdg sets through the
    ``${hydra:...}`` resolver, not resolvable where the launcher is built ("HydraConfig was not
    set"). Its schemas move to ``schema/launcher/<name>`` (which local.yaml and slurm.yaml extend),
    and its names become aliases. A YAML file of the same name cannot do it: Hydra would merge the
    plugin's node into it (deprecated automatic schema matching). Hydra's plugin scan registers the
    plugin's nodes anew when it runs (once per process), so it runs here first."""
    Plugins.instance()
    for name, ours in LAUNCHER_ALIASES.items():
        found = cs.load(f"hydra/launcher/{name}.yaml")
        if found.provider == "promptdg":  # registered before in this process
            continue
        cs.store(group="schema/launcher", name=name, node=found.node, provider="promptdg")
        cs.store(group="hydra/launcher", name=name, node={"defaults": [ours, "_self_"]}, provider="promptdg")


# ---------------------------------------------------------------- ranges
_OPS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def _range_words(r: dict) -> str:
    return " and ".join(f"{_OPS[k][0]} {v}" for k, v in r.items() if v is not None)


def check_node(node, schema, prefix: str) -> None:
    """Every field of ``node`` with a range or choices in ``schema`` (a dataclass) holds a valid value;
    else a ConfigError naming the key, the value and the valid range, in one line."""
    for f in dataclasses.fields(schema):
        if f.name not in node:
            continue
        value, key = node[f.name], f"{prefix}.{f.name}" if prefix else f.name
        if "choices" in f.metadata and value is not None and str(value) not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} is not valid. Valid: {', '.join(f.metadata['choices'])}")
        rng = f.metadata.get("range")
        if not rng or value is None:
            continue
        values = list(value) if f.metadata.get("items") else [value]
        for v in values:
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or any(
                b is not None and not _OPS[op][1](v, b) for op, b in rng.items())
            if bad:
                raise ConfigError(f"{key}={value!r} is out of range: it must be {_range_words(rng)}")
        if f.metadata.get("items") and len(values) == 2 and values[0] >= values[1]:
            raise ConfigError(f"{key}={value!r}: the first value must be below the second")


def check_ranges(cfg: DictConfig, method_schema=None) -> None:
    """Check every ranged value of a composed run config before anything loads: the top-level keys,
    the dataset and the method (``method_schema``: its dataclass; default: the built-in one by name)."""
    check_node(cfg, RunConfig, "")
    if not _DEVICE.match(str(cfg.device)):
        raise ConfigError(f"device={cfg.device!r} is not a device. Valid: auto, cpu, cuda, cuda:N")
    workers = cfg.get("num_workers", "auto")
    if str(workers) != "auto" and (isinstance(workers, bool) or not re.fullmatch(r"\d+", str(workers))):
        raise ConfigError(f"num_workers={workers!r} is not valid. Valid: auto, or an integer >= 0")
    check_node(cfg.dataset, DatasetConfig, "dataset")
    check_node(cfg.backbone, BackboneConfig, "backbone")
    schema = method_schema or METHOD_SCHEMAS.get(str(cfg.method.name))
    if schema is not None:
        check_node(cfg.method, schema, "method")


# ---------------------------------------------------------------- identity of a run
def plain_dict(node: Any, **kwargs: Any) -> Dict[str, Any]:
    """``OmegaConf.to_container(node, **kwargs)`` of a mapping node, typed as the dict it returns
    (omegaconf annotates any container or None)."""
    return cast(Dict[str, Any], OmegaConf.to_container(node, **kwargs))


# Keys that never change a result: paths, prose, logging and hardware choices.
_UNHASHED = {
    # method_defaults: read by the method configs through interpolation, hashed there as values
    "dataset": {"root", "prepare", "method_defaults"},
    "backbone": {"cache_dir", "builder"},
}


# Schema fields added after runs existed: left out of the hash while they hold their default, so
# adding a field to a schema never renames the run directories of configs that do not use it.
_ADDED_LATER = (
    "split_format",
    "split_file",
    "image_dir",
    "split_paths",
    "classnames_file",
    "wnids",
    "subset_from_folders",
    "domain_names",
)
_BACKBONE_ADDED_LATER = ("kind", "image_size")
_HASHED_UNLESS_DEFAULT = {
    "dataset": {k: v for k, v in plain_dict(OmegaConf.structured(DatasetConfig)).items() if k in _ADDED_LATER},
    "backbone": {
        k: v for k, v in plain_dict(OmegaConf.structured(BackboneConfig)).items() if k in _BACKBONE_ADDED_LATER
    },
}


def hashed_view(cfg: DictConfig) -> dict:
    """The part of a run config that determines its results (its identity for skip/resume)."""
    c: Dict[str, Any] = {k: plain_dict(cfg[k], resolve=True) for k in ("method", "dataset", "backbone")}
    c["method"].pop("_target_", None)  # where the class lives, not what it computes
    c.update(seed=cfg.seed, target=cfg.target, source=OmegaConf.to_container(cfg.source) if cfg.source else None)
    shots = cfg.get("shots")
    view: Dict[str, Any] = {
        "method": c["method"],
        "dataset": {
            k: v
            for k, v in c["dataset"].items()
            if k not in _UNHASHED["dataset"]
            and not (k in _HASHED_UNLESS_DEFAULT["dataset"] and v == _HASHED_UNLESS_DEFAULT["dataset"][k])
        },
        "backbone": {
            k: v
            for k, v in c["backbone"].items()
            if k not in _UNHASHED["backbone"]
            and not (k in _HASHED_UNLESS_DEFAULT["backbone"] and v == _HASHED_UNLESS_DEFAULT["backbone"][k])
        },
        "seed": c["seed"],
        "target": c["target"],
        "source": c["source"],
    }
    if shots:  # hashed only when set, so runs without shots keep their directories
        view["shots"] = int(shots)
    if view["dataset"].get("protocol") == "dg":  # DomainBed's split (runs of the former 80/20 split are not reused)
        view["dg_split"] = "domainbed"
    if cfg.get("trial_seed") is not None:  # (the same: hashed only when set)
        view["trial_seed"] = int(cfg.trial_seed)
    # a local checkpoint is named by its path; the demo CLIP lives under a cache root that varies
    if c["backbone"].get("builder"):
        view["backbone"]["pretrained"] = Path(str(c["backbone"]["pretrained"])).name
    return view


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(hashed_view(cfg), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _run_key(method, dataset, backbone, seed, target, source, shots=None, trial_seed=None) -> str:
    # Resolver form of config_hash, used in hydra.run.dir / hydra.sweep.subdir so that the same
    # config always lands in the same directory (reruns skip, interrupted runs resume) and two
    # different configs never share one, even when started in the same second.
    def plain(node):  # resolve while the node is still attached to the run config
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node

    cfg = OmegaConf.create(
        {"method": plain(method), "dataset": plain(dataset), "backbone": plain(backbone), "seed": seed,
         "target": target, "source": plain(source), "shots": shots, "trial_seed": trial_seed}
    )
    trial = f"trial{trial_seed}_" if trial_seed is not None else ""
    return f"seed{seed}_{trial}{target or 'all'}_{f'{shots}shot_' if shots else ''}{config_hash(cfg)}"


def _choices(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))


def epochs_by_shots(shots) -> int:
    """The epochs CoOp's and DAPT's official scripts train for k shots: they pick the config by shot
    count (CoOp's COOP.md, DAPT's scripts/main.sh): *_ep50 for 1 shot, *_ep100 for 2 and 4, the
    200-epoch config for 8 and 16 (ImageNet: *_ep50 at every k, set in its dataset YAML). Without
    shots (all the source data, DG) promptdg uses 50, the ImageNet schedule (large training sets)."""
    if not shots or int(shots) <= 1:
        return 50
    return 100 if int(shots) <= 4 else 200


def register_resolvers() -> None:
    for name in ("promptdg.epochs_by_shots", "promptdg.dapt_epochs"):  # (the second: run configs written before 0.2)
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, epochs_by_shots)
    if not OmegaConf.has_resolver("promptdg.run_key"):
        OmegaConf.register_new_resolver("promptdg.run_key", _run_key)
    if not OmegaConf.has_resolver("promptdg.choices"):
        OmegaConf.register_new_resolver("promptdg.choices", _choices)


def compose_run(*overrides: str) -> DictConfig:
    """The run config exactly as ``promptdg train <overrides>`` composes it (for scripts that need a
    run's dataset, backbone or method without running it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def method_schema_of(method) -> Optional[type]:
    """The schema of a composed method config: a built-in's by name (torch-free), else the class its
    ``_target_`` names (importing it), whose ``Config`` is the schema (None: it has none)."""
    target = str(method.get("_target_") or "")
    if not target or target.startswith("promptdg_cli.methods."):
        return METHOD_SCHEMAS.get(str(method.name))
    from .methods import method_class

    return getattr(method_class(method), "Config", None)


def typed_method(method, schema: Optional[type] = None) -> DictConfig:
    """A method's config as its class gets it: its values, resolved, merged onto its schema (a
    misspelled key or a wrong type is an error naming the key; a key the YAML leaves out takes the
    schema's default). ``schema``: the schema, when known (default: :func:`method_schema_of`)."""
    schema = schema or method_schema_of(method)
    plain = plain_dict(method, resolve=True)
    if schema is None:
        return OmegaConf.create(plain)
    try:
        return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(schema), plain))  # (a mapping onto a mapping)
    except Exception as e:  # omegaconf's validation errors name the key
        raise ConfigError(f"method={plain.get('name')} ({plain.get('_target_')}): {e}".splitlines()[0]) from None


def compose_method(choice: str, *overrides: str, dataset: str = "demo_digits") -> DictConfig:
    """A method's config exactly as ``promptdg train method=<choice> dataset=<dataset>`` composes it
    (its YAML holds every value), with ``key=value`` overrides of the method's keys, typed and
    detached from the run config (for tests and scripts that build a method directly)."""
    cfg = compose_run(f"method={choice}", f"dataset={dataset}", *[f"method.{o}" for o in overrides])
    return typed_method(cfg.method)
