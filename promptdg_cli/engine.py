"""Running a config: splits, training through the method interface, checkpoints, records.

A run directory holds Hydra's ``.hydra/`` dump, ``metrics.jsonl`` (one line per logged step or
epoch), ``splits/<target>/`` (the checkpoint while a split trains, its final model and its
``result.json`` once done) and ``results.json``, written atomically and last.

* A finished run (``results.json`` with status ``finished`` and the same config hash) is skipped.
* An interrupted run resumes: finished splits are read back, the split in progress restarts from
  its last epoch checkpoint (methods checkpoint every epoch through ``TrainContext``).
* A failed run writes ``results.json`` with status ``failed`` and the error, and exits non-zero.
* Checkpoints are ``torch.save`` files read back with ``weights_only=True``; final models and the
  feature cache are safetensors: loading never executes code from a file.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .config import ConfigError, UserError, config_hash
from .data import (
    FeatureCache, Features, Split, class_names, dataset_dir, few_shot_features, make_splits, sample_shots,
    source_free_split, split_features, uda_splits,
)
from .methods import get_method

log = logging.getLogger("promptdg")


class RunLocked(UserError, RuntimeError):
    pass


# --------------------------------------------------------------------- small file helpers
def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available. Valid here: auto, cpu")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"cpu_rss": round(rss_kb / 1024, 1), "cuda": None if cuda is None else round(cuda, 1)}


class _Lock:
    """One process per run directory; a stale lock (dead pid on this host) is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, me.encode())
                os.close(fd)
                return self
            except FileExistsError:
                host, _, pid = self.path.read_text().partition(":")
                alive = host == socket.gethostname() and pid.isdigit() and _pid_alive(int(pid))
                if alive:
                    raise RunLocked(f"{self.path.parent} is being written by process {pid} on {host}; not starting a second copy.")
                self.path.unlink(missing_ok=True)
        raise RunLocked(f"could not lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------- training context
class TrainContext:
    """What a method's ``fit`` may use: seed, checkpoints, metrics, progress, evaluation."""

    def __init__(self, run_dir: Path, split_dir: Path, target: str, seed: int, device: torch.device, dataset: str = "", shots=None):
        self.run_dir, self.split_dir, self.target, self.seed, self.device = run_dir, split_dir, target, seed, device
        self.dataset = dataset  # the dataset's name, for methods whose paper defaults differ by dataset
        self.shots = shots  # k images per class (None: all), for schedules that depend on it
        self.ckpt = split_dir / "checkpoint.pt"

    def load_checkpoint(self) -> Optional[dict]:
        if not self.ckpt.is_file():
            return None
        state = torch.load(self.ckpt, map_location=self.device, weights_only=True)
        log.info("resuming %s from its checkpoint (epoch %s)", self.target, state.get("epoch"))
        return state

    def save_checkpoint(self, state: dict) -> None:
        torch_save_atomic(state, self.ckpt)

    def log(self, **metrics) -> None:
        line = {"time": round(time.time(), 3), "target": self.target, **metrics}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line, default=float) + "\n")

    @staticmethod
    def progress(iterable, desc: str, **kw):
        return tqdm(iterable, desc=desc, unit="it", leave=False, dynamic_ncols=True, **kw)

    @torch.no_grad()
    def accuracy(self, method, feats: Features) -> float:
        return evaluate(method, feats)["top1"]


@torch.no_grad()
def evaluate(method, feats: Features, chunk: int = 8192, subset=None) -> dict:
    """Top-1 accuracy and mean per-class accuracy (%), on cached features (re-encoded first by a
    method whose prompts change the image features: ``features_for``). ``subset``: class indices
    the test set covers (ImageNet-A/R: 200 of 1000); the prediction is restricted to them."""
    if hasattr(method, "features_for"):
        feats = method.features_for(feats)
    keep = None if subset is None else torch.as_tensor(list(subset), dtype=torch.long)
    preds = []
    for i in range(0, len(feats), chunk):
        logits = method.logits(feats.x[i : i + chunk]).cpu()
        preds.append(logits.argmax(-1) if keep is None else keep[logits[:, keep].argmax(-1)])
    preds = torch.cat(preds)
    y = feats.y
    correct = (preds == y).float()
    per_class = [correct[y == c].mean().item() for c in torch.unique(y)]
    return {"top1": round(100 * correct.mean().item(), 4), "mean_per_class": round(100 * sum(per_class) / len(per_class), 4), "n": len(y)}


# --------------------------------------------------------------------- train / eval
def run(cfg: DictConfig, run_dir: Path, mode: str = "train") -> dict:
    """Train (or only evaluate) one config in ``run_dir``; returns the results record."""
    check_backbone(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    chash = config_hash(cfg)
    if results_path.is_file():
        old = json.loads(results_path.read_text())
        if old.get("config_hash") != chash:
            raise RuntimeError(
                f"{run_dir} already holds results of a different config (hash {old.get('config_hash')} != {chash}); "
                f"refusing to overwrite them. Choose another hydra.run.dir."
            )
        if old.get("status") == "finished" and not cfg.force:
            print(f"[promptdg] skipped: {run_dir} already finished with this config (force=true reruns it)")
            return old
    with _Lock(run_dir):
        try:
            record = _run_locked(cfg, run_dir, chash, mode)
        except BaseException as e:
            failed = _base_record(cfg, run_dir, chash) | {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
            write_json_atomic(results_path, failed)
            raise
    write_json_atomic(results_path, record)
    return record


def check_backbone(cfg) -> None:
    """A method that needs a ViT image encoder refuses a ResNet backbone before anything is loaded."""
    method_cls = get_method(cfg.method.name)
    if method_cls.needs_vit and cfg.backbone.arch != "vit":
        raise ConfigError(
            f"method={cfg.method.name} puts visual prompts into a ViT image encoder; backbone={cfg.backbone.name} "
            f"is a {cfg.backbone.arch}. Valid backbones: vit_b32, vit_b16, vit_l14, demo_clip."
        )


def _base_record(cfg: DictConfig, run_dir: Path, chash: str) -> dict:
    return {
        "status": "running",
        "method": cfg.method.name,
        "variant": cfg.method.variant,
        "dataset": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "model": cfg.backbone.model,
        "pretrained": str(cfg.backbone.pretrained),
        "protocol": _protocol_or_dataset(cfg),
        "seed": cfg.seed,
        "domains": list(cfg.dataset.domains),
        "config_hash": chash,
        "run_dir": str(run_dir),
        "version": __version__,
        "git_revision": git_revision(),
        "host": platform.node(),
    }


def _run_locked(cfg: DictConfig, run_dir: Path, chash: str, mode: str) -> dict:
    from .backbone import ClipBackbone

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    method_cls = get_method(cfg.method.name)
    if mode == "train" and not method_cls.trains:
        log.info("%s trains nothing: evaluating only", cfg.method.name)
    protocol = run_protocol(cfg, method_cls)
    if protocol == "fewshot":
        if method_cls.source_free or method_cls.protocol == "uda" or cfg.target or cfg.source:
            raise ConfigError(
                f"dataset={cfg.dataset.name} follows the few-shot protocol (train/val/test split files, no domains): "
                f"method={cfg.method.name} needs domains, and target=/source= do not apply. "
                f"Few-shot methods: zeroshot, linear_probe, coop, dapt."
            )
        splits = [Split(target=cfg.dataset.name, sources=[], key=cfg.dataset.name)]
    elif method_cls.source_free:
        splits = [source_free_split(cfg.dataset, cfg.target, cfg.source, cfg.method.name)]
    elif protocol == "uda":
        splits = uda_splits(cfg.dataset, cfg.target, cfg.source)
    else:
        splits = make_splits(cfg.dataset, cfg.target, cfg.source)
    if protocol != "fewshot":
        dataset_dir(cfg.dataset)  # a missing dataset fails before any model is loaded
    names = _class_names(cfg.dataset)  # (a few-shot dataset's split file: read here, before any model)
    backbone = ClipBackbone.from_config(cfg.backbone, device=device)
    cache = FeatureCache(cfg.cache_root, num_workers=cfg.num_workers)
    record = _base_record(cfg, run_dir, chash) | {"protocol": protocol, "shots": cfg.get("shots")}
    record.update(target_domains=[], source_domains={}, accuracy={}, mean_per_class_accuracy={}, val_accuracy={})
    timings = {"train_s": 0.0, "eval_s": 0.0}
    for split in splits:
        split_dir = run_dir / "splits" / split.dirname
        split_dir.mkdir(parents=True, exist_ok=True)
        done = split_dir / "result.json"
        if done.is_file():
            res = json.loads(done.read_text())
            print(f"[promptdg] {split.target}: finished earlier, read back")
        else:
            res = _run_split(cfg, method_cls, backbone, cache, names, split, split_dir, run_dir, device)
            write_json_atomic(done, res)
        tests = res["tests"] if "tests" in res else {split.key: res["test"]}
        for domain, test in tests.items():
            print(f"[promptdg] {cfg.method.name} {cfg.dataset.name} target={domain}: top-1 {test['top1']:.1f}%")
            record["target_domains"].append(domain)
            record["source_domains"][domain] = split.sources
            record["accuracy"][domain] = test["top1"]
            record["mean_per_class_accuracy"][domain] = test["mean_per_class"]
        if res.get("val") is not None:
            record["val_accuracy"][split.key] = res["val"]["top1"]
        for k, v in res.get("extra", {}).items():  # counters of the method (DomainFusion: generated_images)
            record[k] = record.get(k, 0) + v
        timings["train_s"] += res["train_s"]
        timings["eval_s"] += res["eval_s"]
    if method_cls.source_free:
        record["source_free"] = True
    if cfg.dataset.metric != "mean_per_class":
        record.pop("mean_per_class_accuracy")
    acc = record["accuracy"]
    record["avg_accuracy"] = sum(acc.values()) / len(acc)
    record["timings"] = timings | {"total_s": time.time() - t0}
    record["peak_memory_mb"] = peak_memory_mb(device)
    record["feature_cache"] = {"hits": cache.hits, "misses": cache.misses}
    record["status"] = "finished"
    return record


def _protocol_or_dataset(cfg) -> str:
    try:
        return run_protocol(cfg, get_method(cfg.method.name))
    except ConfigError:
        return cfg.dataset.protocol


def run_protocol(cfg, method_cls) -> str:
    """The protocol a run follows: a few-shot dataset's, else the method's own (DAPL: uda) or the dataset's."""
    if cfg.dataset.protocol == "fewshot":
        return "fewshot"
    return method_cls.protocol or cfg.dataset.protocol


def _run_split(cfg, method_cls, backbone, cache, names, split, split_dir, run_dir, device) -> dict:
    torch.manual_seed(cfg.seed)
    method = method_cls(cfg.method, backbone, names, device)
    method.num_workers, method.cache_root = cfg.num_workers, cfg.cache_root
    shots = cfg.get("shots")
    ctx = TrainContext(run_dir, split_dir, split.key, cfg.seed, device, dataset=cfg.dataset.name, shots=shots)
    protocol = run_protocol(cfg, method_cls)
    views = int(cfg.method.get("aug_views", 0) or 0)
    if method_cls.source_free:  # no data at all; it trains before any image is read
        data = {}
    elif protocol == "fewshot" and not method_cls.trains:  # zero-shot: the test split is all it needs
        from .fewshot import read_split

        paths, labels, _ = read_split(cfg.dataset, "test")
        data = {"test": cache.list_features(backbone, cfg.dataset.name, "test", paths, labels)}
    elif protocol == "fewshot":
        data, _ = few_shot_features(cache, backbone, cfg.dataset, shots, cfg.seed)
    else:
        data = split_features(cache, backbone, cfg.dataset, split, cfg.seed, uda=protocol == "uda", views=views)
        if shots:  # k shots per class of the source training data; validation min(k, 4) per class
            if views:
                raise ConfigError("shots= with method.aug_views is not supported; choose one")
            data["train"] = sample_shots(data["train"], shots, cfg.seed)
            data["val"] = sample_shots(data["val"], shots, cfg.seed, cap=4)
    t = time.time()
    if method_cls.trains:
        method.fit({k: v for k, v in data.items() if k != "test"}, ctx)  # the target's labels stay here
    train_s = time.time() - t
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    if state:
        save_file(state, str(split_dir / "model.safetensors"))
    ctx.ckpt.unlink(missing_ok=True)  # the final model replaces the resume checkpoint
    t = time.time()
    if "test" in data:  # DG / UDA / few-shot: the target domain or test split, loaded with the split
        subset = None
        if protocol == "fewshot":
            from .fewshot import class_subset

            subset = class_subset(cfg.dataset)  # ImageNet-A/R: predict among their 200 classes
        tests = {split.key: evaluate(method, data["test"], subset=subset)}
    else:
        tests = {d: evaluate(method, cache.domain_features(backbone, cfg.dataset, d)) for d in split.tests}
    val = evaluate(method, data["val"]) if len(data.get("val") or ()) else None
    return {
        "target": split.target,
        "sources": split.sources,
        "tests": tests,
        "val": val,
        "n_train": len(data["train"]) if "train" in data else 0,
        "n_target_unlabelled": len(data["target"]) if "target" in data else 0,
        "extra": method.extra_results(),
        "train_s": train_s,
        "eval_s": time.time() - t,
    }


def _class_names(dataset_cfg) -> list:
    if dataset_cfg.protocol == "fewshot":
        from .fewshot import read_split

        return read_split(dataset_cfg, "test")[2]
    return class_names(dataset_cfg)


def load_split_model(cfg, run_dir: Path, target: str, backbone, device) -> Any:
    """A finished split's method with its saved model (for ``promptdg eval run_dir=...``)."""
    method = get_method(cfg.method.name)(cfg.method, backbone, _class_names(cfg.dataset), device)
    method.num_workers, method.cache_root = cfg.num_workers, cfg.cache_root
    f = run_dir / "splits" / target / "model.safetensors"
    if f.is_file():
        method.load_state_dict(load_file(str(f)))
    return method


def _reevaluate_split_dataset(cfg, run_cfg, source_run: Path, out_dir: Path) -> dict:
    """A finished run's model on the test split of a split-file dataset with the same label space
    (ImageNet -> ImageNet-V2 / -Sketch / -A / -R; A and R restrict the prediction to their classes)."""
    from .backbone import ClipBackbone
    from .fewshot import class_subset, read_split

    t0 = time.time()
    paths, labels, names = read_split(cfg.dataset, "test")
    if list(names) != list(_class_names(run_cfg.dataset)):
        raise ConfigError(
            f"dataset={cfg.dataset.name} has other classes than the run's dataset ({run_cfg.dataset.name}); "
            f"a trained classifier can only be re-evaluated on a dataset with the same label space."
        )
    device = select_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = ClipBackbone.from_config(run_cfg.backbone, device=device)
    cache = FeatureCache(cfg.cache_root, num_workers=cfg.num_workers)
    (split,) = [p.name for p in (source_run / "splits").iterdir() if (p / "result.json").is_file()]
    method = load_split_model(run_cfg, source_run, split, backbone, device)
    subset = class_subset(cfg.dataset)
    res = evaluate(method, cache.list_features(backbone, cfg.dataset.name, "test", paths, labels), subset=subset)
    print(f"[promptdg] re-evaluated {source_run.name} on {cfg.dataset.name}: top-1 {res['top1']:.1f}%")
    record = _base_record(cfg, out_dir, config_hash(cfg)) | {
        "method": run_cfg.method.name, "variant": run_cfg.method.variant, "backbone": run_cfg.backbone.name,
        "model": run_cfg.backbone.model, "pretrained": str(run_cfg.backbone.pretrained), "protocol": "fewshot",
        "shots": run_cfg.get("shots"), "seed": run_cfg.seed, "evaluated_run": str(source_run),
        "trained_on": run_cfg.dataset.name, "target_domains": [cfg.dataset.name], "source_domains": {cfg.dataset.name: [run_cfg.dataset.name]},
        "accuracy": {cfg.dataset.name: res["top1"]}, "avg_accuracy": res["top1"], "class_subset": None if subset is None else len(subset),
        "timings": {"total_s": time.time() - t0}, "peak_memory_mb": peak_memory_mb(device), "status": "finished",
    }
    write_json_atomic(out_dir / "results.json", record)
    return record


def reevaluate(cfg: DictConfig, source_run: Path, out_dir: Path) -> dict:
    """Re-evaluate the saved models of a finished run, on its dataset or on another one.

    The method and backbone come from the finished run's config; the dataset from this command
    (``dataset=...``), which must have the same classes. Each saved split model is tested on
    ``target`` when given, else on its own held-out domain when that exists in the dataset, else on
    every domain of the dataset (a run with several split models then needs ``target=``).
    """
    from .backbone import ClipBackbone

    run_cfg_file = source_run / ".hydra" / "config.yaml"
    results = source_run / "results.json"
    if not run_cfg_file.is_file() or not results.is_file() or json.loads(results.read_text()).get("status") != "finished":
        raise ConfigError(f"run_dir={str(source_run)!r} is not a finished promptdg run (needs .hydra/config.yaml and a finished results.json)")
    run_cfg = OmegaConf.load(run_cfg_file)
    if cfg.dataset.protocol == "fewshot":
        return _reevaluate_split_dataset(cfg, run_cfg, source_run, out_dir)
    if list(run_cfg.dataset.classes.values()) != list(cfg.dataset.classes.values()):
        raise ConfigError(
            f"dataset={cfg.dataset.name} has other classes than the run's dataset ({run_cfg.dataset.name}); "
            f"a trained classifier can only be re-evaluated on a dataset with the same classes."
        )
    t0 = time.time()
    device = select_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = ClipBackbone.from_config(run_cfg.backbone, device=device)
    cache = FeatureCache(cfg.cache_root, num_workers=cfg.num_workers)
    targets = sorted(p.name for p in (source_run / "splits").iterdir() if (p / "result.json").is_file())
    plan = {}
    for t in targets:
        trained_for = json.loads((source_run / "splits" / t / "result.json").read_text()).get("target", t)
        if cfg.target:
            plan[t] = [cfg.target]
        elif trained_for in cfg.dataset.domains:
            plan[t] = [trained_for]
        else:
            plan[t] = list(cfg.dataset.domains)
    if len(targets) > 1 and any(len(v) > 1 for v in plan.values()):
        raise ConfigError(f"run_dir has {len(targets)} split models ({targets}); choose the domain to test with target=<domain>")
    record = _base_record(cfg, out_dir, config_hash(cfg)) | {
        "method": run_cfg.method.name,
        "variant": run_cfg.method.variant,
        "backbone": run_cfg.backbone.name,
        "model": run_cfg.backbone.model,
        "pretrained": str(run_cfg.backbone.pretrained),
        "evaluated_run": str(source_run),
        "target_domains": [],
        "source_domains": {},
        "accuracy": {},
    }
    for t, domains in plan.items():
        method = load_split_model(run_cfg, source_run, t, backbone, device)
        sources = json.loads((source_run / "splits" / t / "result.json").read_text())["sources"]
        for d in domains:
            res = evaluate(method, cache.domain_features(backbone, cfg.dataset, d))
            record["target_domains"].append(d)
            record["source_domains"][d] = sources
            record["accuracy"][d] = res["top1"]
            print(f"[promptdg] re-evaluated {source_run.name} (model for {t}) on {cfg.dataset.name}/{d}: top-1 {res['top1']:.1f}%")
    record["avg_accuracy"] = sum(record["accuracy"].values()) / len(record["accuracy"])
    record["timings"] = {"total_s": time.time() - t0}
    record["peak_memory_mb"] = peak_memory_mb(device)
    record["status"] = "finished"
    write_json_atomic(out_dir / "results.json", record)
    return record
