"""The run config: top-level schema, config registration, resolvers and the run key.

``register_configs()`` is the one place that stores schemas in Hydra's ConfigStore: the top-level
``RunConfig`` (so ``dataset`` and ``backbone`` are typed by their dataclasses), every method's
own schema under ``schema/method/<name>`` (each ``conf/method/<name>.yaml`` lists it first in its
defaults) and the submitit launcher's schemas under ``schema/launcher/<name>``. The methods are found through the registry, never through import side effects.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from .schema import BackboneConfig, DatasetConfig


class UserError(Exception):
    """Bad input from the user (a config value, a missing folder or file): shown as one message."""


class ConfigError(UserError, ValueError):
    """A config value that is not valid; the message names the key, the value and what is valid."""


def conf_dir() -> Path:
    """conf/ inside an installed wheel (promptdg_cli/conf), else the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"promptdg's conf/ directory was not found next to {here}")


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
    shots: Optional[int] = None
    data_root: str = MISSING
    cache_root: str = MISSING
    out_root: str = "outputs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 2  # image-loading workers of the feature extractor
    force: bool = False  # rerun even when a finished results.json with this config exists
    run_dir: Optional[str] = None  # eval only: a finished run whose models are re-evaluated
    extra: Any = field(default_factory=dict)  # free-form notes, recorded but not hashed


def register_configs() -> None:
    from .methods import REGISTRY

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, method_cls in REGISTRY.items():
        cs.store(group="schema/method", name=name, node=method_cls.Config)
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


# ---------------------------------------------------------------- identity of a run
# Keys that never change a result: paths, prose, logging and hardware choices.
_UNHASHED = {
    "dataset": {"root", "prepare"},
    "backbone": {"cache_dir", "builder"},
}


# Schema fields added after runs existed: left out of the hash while they hold their default, so
# adding a field to a schema never renames the run directories of configs that do not use it.
_FEW_SHOT_KEYS = ("split_format", "split_file", "image_dir", "split_paths", "classnames_file", "wnids", "subset_from_folders")
_HASHED_UNLESS_DEFAULT = {
    "dataset": {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(DatasetConfig)).items() if k in _FEW_SHOT_KEYS},
}


def hashed_view(cfg: DictConfig) -> dict:
    """The part of a run config that determines its results (its identity for skip/resume)."""
    c = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("method", "dataset", "backbone")}
    c.update(seed=cfg.seed, target=cfg.target, source=OmegaConf.to_container(cfg.source) if cfg.source else None)
    shots = cfg.get("shots")
    view = {
        "method": c["method"],
        "dataset": {
            k: v for k, v in c["dataset"].items()
            if k not in _UNHASHED["dataset"] and not (k in _HASHED_UNLESS_DEFAULT["dataset"] and v == _HASHED_UNLESS_DEFAULT["dataset"][k])
        },
        "backbone": {k: v for k, v in c["backbone"].items() if k not in _UNHASHED["backbone"]},
        "seed": c["seed"],
        "target": c["target"],
        "source": c["source"],
    }
    if shots:  # hashed only when set, so runs without shots keep their directories
        view["shots"] = int(shots)
    # a local checkpoint is named by its path; the demo CLIP lives under a cache root that varies
    if c["backbone"].get("builder"):
        view["backbone"]["pretrained"] = Path(str(c["backbone"]["pretrained"])).name
    return view


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(hashed_view(cfg), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _run_key(method, dataset, backbone, seed, target, source, shots=None) -> str:
    # Resolver form of config_hash, used in hydra.run.dir / hydra.sweep.subdir so that the same
    # config always lands in the same directory (reruns skip, interrupted runs resume) and two
    # different configs never share one, even when started in the same second.
    def plain(node):  # resolve while the node is still attached to the run config
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node

    cfg = OmegaConf.create(
        {"method": plain(method), "dataset": plain(dataset), "backbone": plain(backbone), "seed": seed,
         "target": target, "source": plain(source), "shots": shots}
    )
    return f"seed{seed}_{target or 'all'}_{f'{shots}shot_' if shots else ''}{config_hash(cfg)}"


def _choices(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("promptdg.run_key"):
        OmegaConf.register_new_resolver("promptdg.run_key", _run_key)
    if not OmegaConf.has_resolver("promptdg.choices"):
        OmegaConf.register_new_resolver("promptdg.choices", _choices)
