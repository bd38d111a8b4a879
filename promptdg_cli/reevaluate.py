"""``promptdg eval run_dir=...``: a finished run's saved models tested again, on its dataset or another.

The method and backbone come from the finished run's config; the dataset from this command
(``dataset=...``), which must have the same classes. A domain is tested as the run's protocol tests
it (DG: DomainBed's "in" part at the run's trial_seed). Each saved split model is tested on
``target`` when given, else on its own held-out domain when that exists in the dataset, else on
every domain of the dataset (a run with several split models then needs ``target=``). A run trained
on a split-file dataset (ImageNet) is tested on the test split of another with the same label space
(ImageNet-V2 / -Sketch / -A / -R; A and R restrict the prediction to their classes).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, cast

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from .config import config_hash, typed_method
from .data import FeatureCache, class_names
from .devices import loader_workers, peak_memory_mb, select_device
from .errors import ConfigError
from .evaluation import evaluate
from .fewshot import class_subset, read_split
from .methods import method_class
from .protocols import DOMAIN_PROTOCOLS, Protocol, RunSpec
from .record import RunRecord, Status
from .runner import identity, prepare_backbone, run_env


def _classnames(dataset_cfg) -> list:
    return (
        list(read_split(dataset_cfg, "test")[2]) if str(dataset_cfg.protocol) == "fewshot" else class_names(dataset_cfg)
    )


def load_split_model(run_cfg, run_dir: Path, split: str, backbone, device) -> Any:
    """A finished split's method with its saved model."""
    cls = method_class(run_cfg.method)
    method = cls(
        typed_method(run_cfg.method, getattr(cls, "Config", None)),
        backbone,
        _classnames(run_cfg.dataset),
        device,
        run_env(run_cfg),
    )
    f = run_dir / "splits" / split / "model.safetensors"
    if f.is_file():
        method.load_state_dict(load_file(str(f)))
    return method


def _record(cfg, run_cfg, out_dir: Path, source_run: Path, t0: float, device, **results) -> RunRecord:
    ident = identity(cfg, out_dir, config_hash(cfg), str(results.pop("protocol", cfg.dataset.protocol)))
    ident |= {
        "method": run_cfg.method.name,
        "variant": run_cfg.method.variant,
        "backbone": run_cfg.backbone.name,
        "model": run_cfg.backbone.model,
        "pretrained": str(run_cfg.backbone.pretrained),
        "seed": int(run_cfg.seed),
        "device": str(device),
        "precision": str(run_cfg.backbone.precision),
    }
    acc = results["accuracy"]
    rec = RunRecord(status=Status.FINISHED, **ident | {"shots": run_cfg.get("shots")}, evaluated_run=str(source_run),
                    avg_accuracy=sum(acc.values()) / len(acc), timings={"total_s": time.time() - t0},
                    peak_memory_mb=peak_memory_mb(device), **results)
    rec.write(out_dir / "results.json")
    return rec


def _reevaluate_split_dataset(cfg, run_cfg, source_run: Path, out_dir: Path) -> RunRecord:
    t0 = time.time()
    paths, labels, names = read_split(cfg.dataset, "test")
    if list(names) != list(_classnames(run_cfg.dataset)):
        raise ConfigError(f"dataset={cfg.dataset.name} has other classes than the run's dataset "
                          f"({run_cfg.dataset.name}); a trained classifier can only be re-evaluated on a dataset "
                          f"with the same label space.")
    device = select_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = prepare_backbone(run_cfg.backbone, device)
    cache = FeatureCache(cfg.cache_root, num_workers=loader_workers(cfg.num_workers)[0])
    (split,) = [p.name for p in (source_run / "splits").iterdir() if (p / "result.json").is_file()]
    method = load_split_model(run_cfg, source_run, split, backbone, device)
    subset = class_subset(cfg.dataset)
    res = evaluate(method, cache.list_features(backbone, cfg.dataset.name, "test", paths, labels), subset=subset)
    print(f"[promptdg] re-evaluated {source_run.name} on {cfg.dataset.name}: top-1 {res['top1']:.1f}%")
    name = cfg.dataset.name
    return _record(cfg, run_cfg, out_dir, source_run, t0, device, protocol="fewshot", trained_on=run_cfg.dataset.name,
                   target_domains=[name], source_domains={name: [run_cfg.dataset.name]}, accuracy={name: res["top1"]},
                   class_subset=None if subset is None else len(subset))


def reevaluate(cfg: DictConfig, source_run: Path, out_dir: Path) -> RunRecord:
    """Re-evaluate the saved models of a finished run (see the module docstring)."""
    run_cfg_file, results = source_run / ".hydra" / "config.yaml", source_run / "results.json"
    if (
        not run_cfg_file.is_file()
        or not results.is_file()
        or json.loads(results.read_text()).get("status") != "finished"
    ):
        raise ConfigError(
            f"run_dir={str(source_run)!r} is not a finished promptdg run "
            f"(needs .hydra/config.yaml and a finished results.json)"
        )
    run_cfg = cast(DictConfig, OmegaConf.load(run_cfg_file))  # (a run's config is a mapping)
    if str(cfg.dataset.protocol) == "fewshot":
        return _reevaluate_split_dataset(cfg, run_cfg, source_run, out_dir)
    if list(run_cfg.dataset.classes.values()) != list(cfg.dataset.classes.values()):
        raise ConfigError(
            f"dataset={cfg.dataset.name} has other classes than the run's dataset ({run_cfg.dataset.name}); "
            f"a trained classifier can only be re-evaluated on a dataset with the same classes."
        )
    t0 = time.time()
    device = select_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = prepare_backbone(run_cfg.backbone, device)
    cache = FeatureCache(cfg.cache_root, num_workers=loader_workers(cfg.num_workers)[0])
    targets = sorted(p.name for p in (source_run / "splits").iterdir() if (p / "result.json").is_file())
    plan = {}
    for t in targets:
        trained_for = json.loads((source_run / "splits" / t / "result.json").read_text()).get("target", t)
        plan[t] = (
            [cfg.target]
            if cfg.target
            else [trained_for]
            if trained_for in cfg.dataset.domains
            else list(cfg.dataset.domains)
        )
    if len(targets) > 1 and any(len(v) > 1 for v in plan.values()):
        raise ConfigError(
            f"run_dir has {len(targets)} split models ({targets}); choose the domain to test with target=<domain>"
        )
    found: Dict[str, Any] = {"target_domains": [], "source_domains": {}, "accuracy": {}}
    # a domain is tested as the run's protocol tests it (DG: DomainBed's "in" part at the run's trial_seed;
    # UDA and source-free runs: whole domains)
    kind = DOMAIN_PROTOCOLS.get(method_class(run_cfg.method).protocol or str(run_cfg.dataset.protocol), Protocol)
    spec = RunSpec(seed=int(run_cfg.seed), trial_seed=run_cfg.get("trial_seed"))
    test_set = kind(cfg.dataset, spec).attach(cache, backbone).test_set
    for t, domains in plan.items():
        method = load_split_model(run_cfg, source_run, t, backbone, device)
        sources = json.loads((source_run / "splits" / t / "result.json").read_text())["sources"]
        for d in domains:
            res = evaluate(method, test_set(d))
            found["target_domains"].append(d)
            found["source_domains"][d] = sources
            found["accuracy"][d] = res["top1"]
            print(
                f"[promptdg] re-evaluated {source_run.name} (model for {t}) on {cfg.dataset.name}/{d}: "
                f"top-1 {res['top1']:.1f}%"
            )
    return _record(cfg, run_cfg, out_dir, source_run, t0, device, **found)
