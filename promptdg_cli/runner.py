"""Running a config: the splits of its protocol, training through the method interface, one record.

A run directory holds Hydra's ``.hydra/`` dump, ``metrics.jsonl`` (one line per logged step or
epoch), ``splits/<split>/`` (the checkpoint while a split trains, its final model and its
``result.json`` once done) and ``results.json`` (a :class:`~promptdg_cli.record.RunRecord`), written
atomically and last.

* A finished run (``results.json`` with status ``finished`` and the same config hash) is skipped.
* An interrupted run resumes: finished splits are read back, the split in progress restarts from
  its checkpoint (the training loop writes one after every epoch, and after the step in progress
  when preempted).
* A failed run writes ``results.json`` with status ``failed`` and the error, and exits non-zero.
* A preempted run (SIGTERM, SIGUSR1 or SIGUSR2) stops at the next step boundary with a checkpoint,
  writes status ``preempted``, hands the signal on to the handler that was there before
  (submitit's, which requeues the job) and exits with 128 + the signal number (``preemption.py``).
* Under ``torchrun`` every rank runs this code on its part of each batch (``dist.py``); rank 0
  alone writes files.
"""
from __future__ import annotations

import json
import logging
import platform
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from . import __version__, checkpoints, dist, plugins, tracking
from .backbone import ClipBackbone
from .classifier import ClassifierBackbone
from .compute_once import build_once
from .config import config_hash, plain_dict, typed_method
from .data import FeatureCache
from .devices import loader_workers, peak_memory_mb, reset_peak_memory, select_device, set_matmul_precision
from .environment import environment, git_revision, source_tree
from .errors import ConfigError
from .evaluation import evaluate
from .extras import require
from .files import recovery_event, write_json_atomic
from .locks import RunLocked, run_lock
from .methods import method_class
from .methods.base import RunEnv
from .preemption import STOP, Preempted, chain_and_exit
from .protocols import Split, protocol_for, protocol_name
from .record import PROTOCOL_KEYS, RunRecord, Status, opt_ins_of
from .training import TrainContext

log = logging.getLogger("promptdg")
results_log = logging.getLogger("promptdg.results")  # the job's log file only (conf/train.yaml: hydra.job_logging)


def say(line: str) -> None:
    """A result line: on the terminal (stdout, as always) and in the job's log file."""
    print(line)
    results_log.info(line)


def prepare_backbone(cfg, device: torch.device):
    """The run's frozen backbone: a CLIP (a checkpoint with a ``builder``, the demo CLIP, is built first
    if it is missing: ``plugins.py``) or an ImageNet classifier (``backbone.kind: classifier``)."""
    if str(cfg.get("kind", "clip")) == "classifier":
        return ClassifierBackbone.from_config(cfg, device=device)
    path = Path(str(cfg.pretrained))
    if cfg.builder and not path.is_file():  # jobs that start at once on an empty cache build it once
        build = plugins.load("backbone builder", str(cfg.builder), "backbone.builder")
        build_once(path, path.is_file, lambda: build(path, str(cfg.model)), f"the {cfg.model} checkpoint")
    return ClipBackbone.from_config(cfg, device=device)


def run_env(cfg) -> RunEnv:
    trial = cfg.get("trial_seed")
    return RunEnv(seed=int(cfg.seed), num_workers=loader_workers(cfg.num_workers)[0], cache_root=str(cfg.cache_root),
                  domain_names=plain_dict(cfg.dataset.domain_names), precision=str(cfg.backbone.precision),
                  trial_seed=int(cfg.seed if trial is None else trial), dataset=str(cfg.dataset.name))


def check_method(cfg, method_cls) -> None:
    """What can be refused before anything loads: a method whose optional extra is not installed, one
    that needs a ViT on a ResNet backbone, a CLIP (its text tower) on an ImageNet classifier, or the
    other way round."""
    for extra in method_cls.extras:
        require(extra, f"method={cfg.method.name}")
    kind = str(cfg.backbone.get("kind", "clip"))
    if kind not in method_cls.backbone_kinds:
        need = (
            "an ImageNet classifier (backbone.kind: classifier)"
            if kind == "clip"
            else "a CLIP backbone (its text tower)"
        )
        valid = "resnet50_imagenet" if kind == "clip" else "rn50, rn101, vit_b32, vit_b16, vit_l14, demo_clip"
        raise ConfigError(f"method={cfg.method.name} needs {need}; backbone={cfg.backbone.name} is a {kind} backbone. "
                          f"Valid backbones: {valid}.")
    if _selection(cfg) == "oracle" and protocol_name(cfg, method_cls) != "dg":
        raise ConfigError(f"method.select=oracle is DomainBed's test-domain validation rule, for the DG protocol; "
                          f"this run's protocol is {protocol_name(cfg, method_cls)}. Valid here: val, last.")
    if method_cls.needs_vit and str(cfg.backbone.arch) != "vit":
        raise ConfigError(
            f"method={cfg.method.name} puts visual prompts into a ViT image encoder; backbone={cfg.backbone.name} "
            f"is a {cfg.backbone.arch}. Valid backbones: vit_b32, vit_b16, vit_l14, demo_clip."
        )


def identity(cfg: DictConfig, run_dir: Path, chash: str, protocol: str) -> dict:
    """The record fields that name a run, and the protocol it ran (its opt-ins out of the official one)."""
    method = plain_dict(cfg.method, resolve=True)
    return {
        "method": cfg.method.name,
        "variant": cfg.method.get("variant", ""),
        "dataset": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "model": cfg.backbone.model,
        "pretrained": str(cfg.backbone.pretrained),
        "protocol": protocol,
        "seed": int(cfg.seed),
        "domains": list(cfg.dataset.domains),
        "config_hash": chash,
        "run_dir": str(run_dir),
        "version": __version__,
        "git_revision": git_revision(),
        "host": platform.node(),
        "shots": cfg.get("shots"),
        "device": str(cfg.device),
        "precision": str(cfg.backbone.precision),
        "environment": environment(),
        **source_tree(),
        "protocol_details": {k: method[k] for k in PROTOCOL_KEYS if k in method},
        "opt_ins": opt_ins_of(method),
        "selection": _selection(cfg),
    }


def _selection(cfg) -> str | None:
    """The model-selection rule a record names (None for a method that selects nothing)."""
    select = cfg.method.get("select") if hasattr(cfg.method, "get") else None
    return None if select is None else str(select)


# --------------------------------------------------------------------- train / eval
def run(cfg: DictConfig, run_dir: Path, mode: str = "train") -> RunRecord:
    """Train (or only evaluate) one config in ``run_dir``; returns its record."""
    method_cls = method_class(cfg.method)
    check_method(cfg, method_cls)
    if dist.env_world_size() > 1:  # under torchrun: join the process group (once per process)
        dist.init(select_device(cfg.device))
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    chash = config_hash(cfg)
    ident = identity(cfg, run_dir, chash, protocol_name(cfg, method_cls))
    if results_path.is_file():
        old = json.loads(results_path.read_text())
        if old.get("config_hash") != chash:
            raise RuntimeError(
                f"{run_dir} already holds results of a different config (hash {old.get('config_hash')} != {chash}); "
                f"refusing to overwrite them. Choose another hydra.run.dir."
            )
        if old.get("status") == "finished" and not cfg.force:
            if dist.is_main():
                say(f"[promptdg] skipped: {run_dir} already finished with this config (force=true reruns it)")
            return RunRecord.from_dict(old)
    signum = 0
    STOP.install()  # preemption signals only set a flag while the run trains (preemption.py)
    try:
        with _run_lock(run_dir), tracking.session(cfg, run_dir, chash, main=dist.is_main()) as trackers:
            try:
                record = _run_locked(cfg, run_dir, mode, method_cls, ident)
            except Preempted as e:
                STOP.deferring = True  # a further signal does not interrupt the record
                if dist.is_main():
                    RunRecord(
                        status=Status.PREEMPTED,
                        **ident,
                        error=f"stopped by {e.signame} at a checkpoint; rerun the same command to resume",
                    ).write(results_path)
                raise
            except BaseException as e:
                if dist.is_main():
                    RunRecord(
                        status=Status.FAILED,
                        **ident,
                        error=f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc(),
                    ).write(results_path)
                raise
            trackers.record(record.to_dict())
        if dist.is_main():
            record.write(results_path)
        signum = STOP.agreed()  # a signal during the final evaluation: the run is finished, the process still stops
    except Preempted as e:
        signum = e.signum
    finally:
        received, previous = STOP.signum, STOP.restore()
    if signum:
        chain_and_exit(signum, received, previous)
    return record


@contextmanager
def _run_lock(run_dir: Path):
    """Rank 0 holds the run's lock; the other ranks of a torchrun job learn whether it got it."""
    if not dist.is_main():
        err = dist.broadcast(None)
        if err:
            raise RunLocked(err)
        yield
        return
    try:
        lock = run_lock(run_dir)  # a heartbeat holds it across the nodes of a shared file system (locks.py)
    except RunLocked as e:
        dist.broadcast(str(e))
        raise
    dist.broadcast(None)
    try:
        yield
    finally:
        lock.release()


def _run_locked(cfg: DictConfig, run_dir: Path, mode: str, method_cls, ident: dict) -> RunRecord:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    memory_reset = reset_peak_memory(device)  # this run's peaks, not the process's (a sweep in one process)
    # (TF32 on CUDA by default: explicit)
    matmul = set_matmul_precision(str(cfg.get("matmul_precision", "auto")), device)
    workers, chosen = loader_workers(cfg.num_workers)
    # the device chosen
    ident = {**ident, "device": str(device), "environment": environment(device), "matmul_precision": matmul,
             "data_loading": {"num_workers": workers, "chosen": chosen, "pin_memory": device.type == "cuda"}}
    if mode == "train" and not method_cls.trains:
        log.info("%s trains nothing: evaluating only", cfg.method.name)
    protocol = protocol_for(cfg, method_cls)
    splits = protocol.splits()
    with dist.main_first("preparing the dataset and the backbone"):  # (generated / built on first use)
        protocol.check_data()  # a missing dataset fails before any model is loaded
        names = protocol.classnames()
        backbone = prepare_backbone(cfg.backbone, device)
    cache = FeatureCache(cfg.cache_root, num_workers=workers)
    protocol.attach(cache, backbone)
    per_class = str(cfg.dataset.metric) == "mean_per_class"
    out: Dict[str, Any] = {
        "target_domains": [],
        "source_domains": {},
        "accuracy": {},
        "mean_per_class_accuracy": {},
        "val_accuracy": {},
        "oracle_accuracy": {},
    }
    counters: dict = {}
    recovered: list = []  # unreadable checkpoints, feature files and generated images, and what was done
    shots: dict = {}  # training images per class of each split, as drawn (shots=k)
    samplers: dict = {}  # who drew them: "dassl" (Dassl's algorithm) or CoOp's draw file
    timings = {"train_s": 0.0, "eval_s": 0.0}
    main = dist.is_main()
    for split in splits:
        STOP.stop_here()  # a preemption signal during the previous split's evaluation
        split_dir = run_dir / "splits" / split.dirname
        split_dir.mkdir(parents=True, exist_ok=True)
        done = split_dir / "result.json"
        # (rank 0 reads, every rank follows)
        res = dist.broadcast(_finished_split(split_dir, recovered) if main else None)
        if res is not None:
            if main:
                say(f"[promptdg] {split.target}: finished earlier, read back")
                checkpoints.remove(split_dir / "checkpoint.pt")  # (left by a stop just after the result)
        else:
            res = _run_split(cfg, method_cls, backbone, protocol, names, split, split_dir, run_dir, device)
            if main:
                write_json_atomic(done, res)
                # the final model replaces the resume checkpoint once the split's result is on disk
                checkpoints.remove(split_dir / "checkpoint.pt")
            dist.barrier()
        # (a split finished by promptdg 0.1: "test")
        tests = res["tests"] if "tests" in res else {split.key: res["test"]}
        for domain, test in tests.items():
            if main:
                say(f"[promptdg] {cfg.method.name} {cfg.dataset.name} target={domain}: top-1 {test['top1']:.1f}%")
            out["target_domains"].append(domain)
            out["source_domains"][domain] = split.sources
            out["accuracy"][domain] = test["top1"]
            out["mean_per_class_accuracy"][domain] = test["mean_per_class"]
        if res.get("val") is not None:
            out["val_accuracy"][split.key] = res["val"]["top1"]
        for domain, test in res.get("oracle", {}).items():  # select=oracle: the test domain's held-out part
            out["oracle_accuracy"][domain] = test["top1"]
        # a method's counters (DomainFusion: generated_images), summed over splits
        for k, v in res.get("extra", {}).items():
            counters[k] = counters.get(k, 0) + v
        recovered += res.get("recovered", [])
        if res.get("shots_per_class"):
            shots[split.key] = res["shots_per_class"]
        if res.get("sampler"):
            samplers[split.key] = res["sampler"]
        timings["train_s"] += res["train_s"]
        timings["eval_s"] += res["eval_s"]
    if not per_class:
        out["mean_per_class_accuracy"] = None
    out["oracle_accuracy"] = out["oracle_accuracy"] or None
    rec = RunRecord(
        status=Status.FINISHED,
        **ident,
        **out,
        weights=backbone.weights,
        avg_accuracy=sum(out["accuracy"].values()) / len(out["accuracy"]),
        source_free=method_cls.protocol == "source_free",
        timings=timings | {"total_s": time.time() - t0},
        peak_memory_mb=peak_memory_mb(device, memory_reset),
        feature_cache={"hits": cache.hits, "misses": cache.misses},
        recovered=recovered + cache.recovered,
        data_used={
            "unreadable_images": cache.unreadable,
            "empty_class_folders": cache.empty_classes,
            "shots_per_class": shots,
            "shots_sampler": samplers,
            "augmented_views": cache.views,
        },
    )
    rec.add_counters(counters)
    return rec


def _finished_split(split_dir: Path, events: list) -> dict | None:
    """A finished split's ``result.json``, or None when it has none or its files do not read back (a
    write cut short by a full disk or a flaky network file system): then the split is computed again,
    logged and added to ``events`` (the record's ``recovered``)."""
    done, model = split_dir / "result.json", split_dir / "model.safetensors"
    if not done.is_file():
        return None
    try:
        res = json.loads(done.read_text())
        if not isinstance(res, dict) or not ("tests" in res or "test" in res) or not {"train_s", "eval_s"} <= set(res):
            raise ValueError("not a split result (tests, train_s, eval_s)")
    except (OSError, ValueError) as e:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
        events.append(recovery_event(done, e, "computed the split again"))
        return None
    try:
        if model.is_file() or res.get("saved_model"):
            load_file(str(model))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error kinds on a short file)
        events.append(recovery_event(model, e, "computed the split again"))
        return None
    return res


def _run_split(
    cfg, method_cls, backbone, protocol, names, split: Split, split_dir: Path, run_dir: Path, device
) -> dict:
    torch.manual_seed(cfg.seed)
    method = method_cls(
        typed_method(cfg.method, getattr(method_cls, "Config", None)), backbone, names, device, run_env(cfg)
    )
    data, selection_set = None, None
    with dist.main_first("extracting image features"):  # rank 0 fills the feature cache, the others read it
        if method_cls.trains:
            data = protocol.train_data(split)
        holdout = protocol.holdout_record(split, sources=method_cls.trains)
        # (an opt-in, recorded and marked)
        if method_cls.trains and str(cfg.method.get("select", "last")) == "target_test":
            (selection_set,) = protocol.test_sets(split).values()
    if dist.is_main():
        if holdout is not None:  # the images each domain held out (DG: DomainBed's split)
            write_json_atomic(split_dir / "holdout.json", holdout)
        if data is not None and data.drawn:  # the k-shot images as drawn, in draw order, and who drew them
            write_json_atomic(split_dir / "shots.json", data.drawn)
    ctx = TrainContext(run_dir, split_dir, split.key, int(cfg.seed), device, selection_set=selection_set)
    t = time.time()
    if method_cls.trains:
        with STOP.deferred():  # a preemption signal stops at the loop's next step boundary
            method.fit(data, ctx)
        STOP.stop_here()  # a signal after fit's last safe point
    train_s = time.time() - t
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    if state and dist.is_main():
        save_file(state, str(split_dir / "model.safetensors"))  # (result.json says so: saved_model)
    t = time.time()
    with dist.main_first("extracting image features"):
        tests = protocol.test_sets(split)
        oracle = protocol.oracle_sets(split) if _selection(cfg) == "oracle" else {}
    subset = protocol.test_subset()
    results = {key: evaluate(method, feats, subset=subset) for key, feats in tests.items()}
    oracle = {key: evaluate(method, feats) for key, feats in oracle.items()}
    val = evaluate(method, data.val) if data is not None and data.val is not None and len(data.val) else None
    return {
        "target": split.target,
        "sources": split.sources,
        "tests": results,
        "val": val,
        "oracle": oracle,
        "n_train": len(data.train) if data is not None and data.train is not None else 0,
        "n_target_unlabelled": len(data.target) if data is not None and data.target is not None else 0,
        "shots_per_class": data.shots_per_class(names)
        if cfg.get("shots") and data is not None and data.train is not None
        else None,
        "sampler": data.drawn["sampler"] if data is not None and data.drawn else None,
        "extra": method.extra_results(),
        "recovered": ctx.recovered,
        "train_s": train_s,
        "eval_s": time.time() - t,
        "saved_model": bool(state),
    }
