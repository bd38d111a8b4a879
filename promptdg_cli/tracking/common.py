"""What the trackers share: the names of a run and its group, metric keys, the flattened config."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from ..config import hashed_view, plain_dict

# config keys that are data, not hyper-parameters: left out of the flattened view (the file has them)
NOT_HPARAMS = ("dataset.classes", "dataset.wnids", "dataset.prepare", "dataset.method_defaults", "dataset.split_paths")


# --------------------------------------------------------------------- naming
def group_name(cfg: DictConfig) -> str:
    """The name shared by the runs of one config over seeds: dataset/method/backbone/<target>_<hash>,
    the hash over everything that names a run (``config.hashed_view``) but the seed."""
    view = {k: v for k, v in hashed_view(cfg).items() if k != "seed"}
    digest = hashlib.sha1(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()[:10]
    shots = f"{cfg.shots}shot_" if cfg.get("shots") else ""
    return f"{cfg.dataset.name}/{cfg.method.name}/{cfg.backbone.name}/{cfg.target or 'all'}_{shots}{digest}"


def metric_key(*parts: str) -> str:
    """A key every tracker accepts ("/" separated; a UDA pair's arrow as ``_to_``, "+" as ``_and_``)."""
    text = "/".join(str(p) for p in parts if p != "")
    text = text.replace("→", "_to_").replace("+", "_and_")
    return re.sub(r"[^\w\-./: ]", "_", text)


def flat_hparams(container: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"method.lr": 0.002, ...}`` of the plain config (numbers, strings and booleans as they are;
    null as "null"; a list as its JSON text); the keys of :data:`NOT_HPARAMS` left out."""
    out: Dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if name in NOT_HPARAMS:
            continue
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = "null" if value is None else value
    return out


def numbers(values: Dict[str, Any]) -> Dict[str, float]:
    """The finite numbers of a metrics line (booleans and text left out)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def record_metrics(record: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of a finished record, as the trackers log them."""
    out: Dict[str, float] = {}
    for domain, value in (record.get("accuracy") or {}).items():
        out[metric_key("test", domain)] = value
    for domain, value in (record.get("mean_per_class_accuracy") or {}).items():
        out[metric_key("test", "mean_per_class", domain)] = value
    for split, value in (record.get("val_accuracy") or {}).items():
        out[metric_key("val", split)] = value
    if record.get("avg_accuracy") is not None:
        out["test/avg"] = record["avg_accuracy"]
    for key, value in (record.get("timings") or {}).items():
        out[metric_key("time", key)] = value
    return numbers(out)


class RunInfo:
    """What a backend knows of its run: folder, names, ids kept for a resume, the plain config."""

    def __init__(self, cfg: DictConfig, run_dir: Path, config_hash: str, resume_ids: Dict[str, str]):
        self.run_dir = Path(run_dir)
        self.group = group_name(cfg)
        self.name = f"{self.group.rsplit('/', 1)[0]}/{self.run_dir.name}"  # dataset/method/backbone/<run folder>
        self.seed = int(cfg.seed)
        self.config_hash = config_hash
        self.config = plain_dict(cfg, resolve=True, enum_to_str=True)
        self.config.pop("logger", None)  # (how it was tracked is not a hyper-parameter)
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.create(self.config))
        self.hparams = {**flat_hparams(self.config), "group": self.group, "config_hash": config_hash}
        self.resume_ids = dict(resume_ids)  # backend name -> its run id from an interrupted earlier attempt
        self.ids: Dict[str, str] = {}  # filled by the backends: kept in tracking.json
