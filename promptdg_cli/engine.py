"""Running a config: splits, training through the method interface, checkpoints, records.

A run directory holds Hydra's ``.hydra/`` dump, ``metrics.jsonl`` (one line per logged step or
epoch), ``splits/<target>/`` (the checkpoint while a split trains, its final model and its
``result.json`` once done) and ``results.json``, written atomically and last.

* A finished run (``results.json`` with status ``finished`` and the same config hash) is skipped.
* An interrupted run resumes: finished splits are read back, the split in progress restarts from
  its last checkpoint (methods checkpoint every epoch through ``TrainContext``, and after the step
  in progress when preempted).
* A failed run writes ``results.json`` with status ``failed`` and the error, and exits non-zero.
* A preempted run (SIGTERM, SIGUSR1 or SIGUSR2: Slurm's preemption / time-limit signals) saves a
  checkpoint at the next step boundary, writes ``results.json`` with status ``preempted``, hands the
  signal on to the handler that was there before (submitit's, which requeues the job) and exits with
  128 + the signal number; the same command resumes it exactly (see "Preemption and requeue" below).
* Under ``torchrun`` every rank runs this same code on its shard of each batch (``dist.py``); rank 0
  alone writes files (lock, checkpoints, metrics, split results, ``results.json``).
* Checkpoints are ``torch.save`` files read back with ``weights_only=True``; final models and the
  feature cache are safetensors: loading never executes code from a file.
* A file found unreadable (a checkpoint or feature file cut short, a broken generated image) is
  recovered from (``checkpoints.py``, ``shared_files.py``) and listed in ``results.json``
  under ``recovered``: the file, the error and the action taken.
* The run directory's ``.lock`` (``locks.py``) has a heartbeat, so it holds across the nodes of a
  shared file system, and the lock of a dead process is taken over.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import signal
import subprocess
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from . import checkpoints, dist
from .config import ConfigError, config_hash
from .data import (
    FeatureCache, Features, Split, class_names, dataset_dir, few_shot_features, make_splits, sample_shots,
    source_free_split, split_features, uda_splits,
)
from .locks import RunLocked, run_lock
from .methods import get_method

log = logging.getLogger("promptdg")


# --------------------------------------------------------------------- small file helpers
def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
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
    """The run's device; under torchrun ``auto``/``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available. Valid here: auto, cpu")
    if name == "cuda" and dist.env_world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"cpu_rss": round(rss_kb / 1024, 1), "cuda": None if cuda is None else round(cuda, 1)}


# --------------------------------------------------------------------- preemption
# Preemption and requeue.
#
# While a method's ``fit`` runs, SIGTERM, SIGUSR1 and SIGUSR2 only set a flag (``_StopRequest``; in
# the rest of ``run``, where nothing is in progress that a checkpoint could keep, e.g. while features
# are extracted or a model is evaluated, they stop the run at once). Training code polls it at safe points: ``TrainContext.preempt_point`` (a step boundary: the method passes the
# state to resume from, the checkpoint then carries the step index) and ``save_checkpoint`` (an epoch,
# style or C-value boundary). There the checkpoint is written and ``Preempted`` is raised; ``run``
# records ``status: preempted`` (not ``failed``: the run is resumable), restores the handlers that
# were installed before, calls the previous handler of that signal ("chaining") and, if that returns,
# exits with 128 + the signal number. Rerunning the same command (same config -> same run directory)
# resumes from the checkpoint; mid-epoch it skips the batches already done (the per-epoch orders are
# seeded by (seed, epoch)), so the result equals an uninterrupted run's.
#
# With hydra-submitit-launcher (submitit 1.5): the job process runs submitit's ``process_job``, which
# installs ``checkpoint_and_try_requeue`` on the preemption signal (SIGUSR2 by default, or
# $SUBMITIT_PREEMPT_SIGNAL; sbatch gets ``--signal=USR2@<signal_delay_s>``) and a logging-only
# ``bypass`` on SIGTERM, then calls the launcher, which runs this task function. Our handlers replace
# those for the duration of ``run`` and remember them. On the signal we first finish the step and
# write the checkpoint, then call submitit's handler ourselves: it calls the launcher's
# ``checkpoint()`` (a DelayedSubmission of the same sweep overrides), pickles it, runs ``scontrol
# requeue`` and ``sys.exit(-1)``. The requeued job composes the same config, lands in the same run
# directory (named by the config hash), finds the lock released (or takes over the one a hard kill
# left, see locks.py) and resumes. Had submitit's handler run first (at the signal), it would have
# exited mid-step and lost the progress since the last epoch checkpoint. On SIGTERM (Slurm's preemption with PreemptMode=REQUEUE, where
# Slurm requeues by itself) the chained ``bypass`` only logs, and we exit 143.
#
# Under torchrun a signal may reach some ranks only (torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT,
# and SIGUSR1/2 with ``--signals-to-handle``); the flag is all-reduced (max) at every safe point so
# all ranks stop at the same step, rank 0 writes the checkpoint and all leave after a barrier.
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Preempted(SystemExit):
    """Training stopped at a safe point after a preemption signal; the checkpoint is on disk.

    A ``SystemExit`` (exit code 128 + signal number), so that Hydra's job runner and submitit's
    ``process_job`` (which catch ``Exception``) neither record it as a failure nor swallow it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.signame = signal.Signals(signum).name


class _StopRequest:
    """The process's preemption flag and the signal handlers ``run`` installs for its duration."""

    def __init__(self):
        self.signum = 0  # the first preemption signal received during this run (0: none)
        self.previous: Dict[int, Any] = {}
        self.deferring = False  # True while training: stop at the next safe point, not at once

    def install(self) -> None:
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: preemption signals are not handled")
            return
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            prev = signal.getsignal(sig) if sig is not None else None
            # SIG_IGN: someone chose to ignore it; None: a handler not set from Python we could not restore
            if sig is None or prev is None or prev is signal.SIG_IGN:
                continue
            self.previous[sig] = prev
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
        if not self.deferring:  # nothing to checkpoint (files are written atomically): stop right here
            self.deferring = True  # (a second signal while stopping does not interrupt the stopping)
            raise Preempted(signum)
        # training: only the flag; acting here would interrupt the step at an arbitrary point

    @contextmanager
    def deferred(self):
        """Signals during the block (a method's fit) only ask to stop at the next safe point."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def restore(self) -> dict:
        """Put the previous handlers back and clear the flag (a method's fit called outside ``run``
        never sees a stale request); returns the previous handlers."""
        previous, self.previous, self.signum, self.deferring = self.previous, {}, 0, False
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        return previous

    def agreed(self) -> int:
        """The signal number that asks to stop, agreed by all ranks (collective under torchrun); 0: go on."""
        return dist.all_max(self.signum)


_STOP = _StopRequest()


def _chain_and_exit(signum: int, received: int, previous: dict) -> None:
    """After a preempted (or finished-while-asked-to-stop) run: the previous handler of the signal this
    process received (submitit's requeues and exits), then exit with 128 + signum."""
    prev = previous.get(received) if received else None
    if callable(prev):
        log.info("handing %s on to the previous handler (%s)", signal.Signals(received).name, getattr(prev, "__qualname__", prev))
        prev(received, None)
    raise Preempted(signum)


# --------------------------------------------------------------------- training context
class TrainContext:
    """What a method's ``fit`` may use: seed, checkpoints, metrics, progress, evaluation, and the
    data-parallel and preemption helpers (identities on one process).

    A fit loop (``methods/coop.py``: DDP; ``methods/dapt.py``: sync_grads)::

        state = ctx.load_checkpoint()
        start, done = resume_point(state)          # (epoch, its steps done): "step" after a preemption
        <load params and optimizer from state>
        model = ctx.ddp(self.prompt)               # EITHER train through the DDP wrapper ...
        ctx.broadcast_params(params)               # ... OR keep the modules and sync_grads (below)
        for epoch in range(start, epochs):
            order = <permutation seeded by (ctx.seed, epoch)>          # the same on every rank
            first = done if epoch == start else 0                     # skip the steps done before a stop
            for step, i in enumerate(range(first * bs, n, bs), start=first):
                batch = order[i : i + bs]
                idx = ctx.shard(batch)                                 # this rank's part (may be empty)
                loss = ctx.batch_share(mean_loss(idx), len(idx), len(batch))
                opt.zero_grad(); loss.backward()
                ctx.sync_grads(params)                                 # (not with ctx.ddp: it syncs itself)
                opt.step()
                ctx.preempt_point(lambda: {"epoch": epoch, "step": step + 1, <params, optimizer, ...>})
            <metrics: ctx.all_sum(local sums); validation: ctx.accuracy (all ranks) or ctx.broadcast>
            ctx.log(...)                                               # rank 0 writes
            ctx.save_checkpoint({"epoch": epoch, ...})                 # rank 0 writes; may stop here too

    Every rank must run the same steps and reach the same collectives (``preempt_point``,
    ``save_checkpoint``, ``sync_grads`` / the DDP backward, ``all_sum``, ``broadcast``, ``accuracy``):
    a rank with an empty shard still runs them (with DDP: a forward and ``(out.sum() * 0).backward()``).
    """

    def __init__(self, run_dir: Path, split_dir: Path, target: str, seed: int, device: torch.device, dataset: str = "", shots=None):
        self.run_dir, self.split_dir, self.target, self.seed, self.device = run_dir, split_dir, target, seed, device
        self.dataset = dataset  # the dataset's name, for methods whose paper defaults differ by dataset
        self.shots = shots  # k images per class (None: all), for schedules that depend on it
        self.ckpt = split_dir / "checkpoint.pt"
        self.recovered: list = []  # unreadable files recovered from (checkpoints.py, recovery.py)

    # ----------------------------------------------------------------- ranks (torchrun)
    @property
    def rank(self) -> int:
        return dist.rank()

    @property
    def world(self) -> int:
        return dist.world()

    @property
    def is_main(self) -> bool:
        """Rank 0 (always true on one process): the only writer."""
        return dist.is_main()

    @property
    def distributed(self) -> bool:
        return dist.world() > 1

    @staticmethod
    def shard(batch):
        """This rank's contiguous part of a global batch of indices (all of it on one process)."""
        return dist.shard(batch)

    def batch_share(self, loss: torch.Tensor, n_local: int, n_global: int) -> torch.Tensor:
        """``loss`` (a mean over this rank's n_local samples) as its share of the mean over the global
        batch: ``loss * n_local / n_global``; summed over ranks (``sync_grads``/``ddp`` sum) that is
        the global mean, also for uneven shards. Unchanged on one process."""
        if not self.distributed:
            return loss
        return loss * (n_local / n_global) if n_global else loss * 0.0

    @staticmethod
    def sync_grads(params) -> None:
        """After ``backward``: sum the gradients of ``params`` over ranks (one all-reduce; every rank
        must call it every step, a rank with nothing to do too). No-op on one process."""
        dist.sync_grads(params)

    @staticmethod
    def broadcast_params(params) -> None:
        """Rank 0's values of ``params`` on every rank: call once before training (after loading a
        checkpoint) when gradients go through ``sync_grads`` (``ddp`` does it itself)."""
        dist.broadcast_params(params)

    @staticmethod
    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        """The trainable module in DistributedDataParallel (gradients summed, see ``batch_share``);
        train through the returned wrapper, evaluate and save through ``module``. Identity on one process."""
        return dist.ddp(module)

    @staticmethod
    def all_sum(x):
        """Sum over ranks (a number, an array or a tensor): e.g. the logged loss sums of an epoch."""
        return dist.all_sum(x)

    @staticmethod
    def broadcast(obj):
        """Rank 0's value on every rank (e.g. a validation accuracy every rank selects by)."""
        return dist.broadcast(obj)

    @staticmethod
    def all_gather(obj) -> list:
        """Every rank's (picklable) object, in rank order ([obj] on one process)."""
        return dist.all_gather(obj)

    @staticmethod
    def barrier() -> None:
        dist.barrier()

    @staticmethod
    def main_first(what: str = "preparing"):
        """Context manager: rank 0 runs the block first (e.g. writes a cache of generated images),
        the other ranks after it succeeded (e.g. to read that cache)."""
        return dist.main_first(what)

    # ----------------------------------------------------------------- checkpoints and stopping
    def load_checkpoint(self) -> Optional[dict]:
        state, events = checkpoints.load(self.ckpt, self.device, repair=self.is_main)
        self.recovered += events
        if state is None:
            return None
        log.info("resuming %s from its checkpoint (epoch %s%s)", self.target, state.get("epoch"),
                 f", step {state['step']}" if state.get("step") else "")
        return state

    def _write_checkpoint(self, state: dict) -> None:
        if self.is_main:
            checkpoints.save(state, self.ckpt)
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is on disk

    def save_checkpoint(self, state: dict) -> None:
        """Write the checkpoint (rank 0); then, if a preemption signal came, stop here (``Preempted``)."""
        self._write_checkpoint(state)
        self.preempt_point()

    def should_stop(self) -> bool:
        """Whether a preemption signal asks to stop (agreed by all ranks: a collective under torchrun)."""
        return bool(_STOP.agreed())

    def preempt_point(self, state=None) -> None:
        """A safe point (a step boundary). If a preemption signal came: write ``state`` (a dict, or a
        callable returning it, called only then, on every rank) as the checkpoint and raise
        ``Preempted``. Every rank must reach the same preempt points."""
        signum = _STOP.agreed()
        if not signum:
            return
        if state is not None:
            self._write_checkpoint(state() if callable(state) else state)
        log.warning("%s: stopping at a checkpoint after %s; rerun the same command to resume", self.target, signal.Signals(signum).name)
        raise Preempted(signum)

    # ----------------------------------------------------------------- records and progress
    def log(self, **metrics) -> None:
        if not self.is_main:
            return
        line = {"time": round(time.time(), 3), "target": self.target, **metrics}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line, default=float) + "\n")

    @staticmethod
    def progress(iterable, desc: str, **kw):
        return tqdm(iterable, desc=desc, unit="it", leave=False, dynamic_ncols=True, disable=not dist.is_main(), **kw)

    @torch.no_grad()
    def accuracy(self, method, feats: Features) -> float:
        return evaluate(method, feats)["top1"]


def resume_point(state: Optional[dict]) -> tuple[int, int]:
    """(epoch, steps of it already done) to continue from: a mid-epoch checkpoint carries ``step``,
    an epoch-end one only ``epoch`` (finished)."""
    if state is None:
        return 0, 0
    if state.get("step"):
        return int(state["epoch"]), int(state["step"])
    return int(state["epoch"]) + 1, 0


@torch.no_grad()
def evaluate(method, feats: Features, chunk: int = 8192, subset=None) -> dict:
    """Top-1 accuracy and mean per-class accuracy (%), on cached features (re-encoded first by a
    method whose prompts change the image features: ``features_for``). ``subset``: class indices
    the test set covers (ImageNet-A/R: 200 of 1000); the prediction is restricted to them.
    Under torchrun each rank predicts its contiguous part and every rank gets all the predictions."""
    y = feats.y
    if dist.world() > 1:  # (DAPT re-encodes images: the ranks share that work)
        a, b = dist.shard_range(len(feats))
        feats = feats.subset(range(a, b))
    if hasattr(method, "features_for") and len(feats):
        feats = method.features_for(feats)
    keep = None if subset is None else torch.as_tensor(list(subset), dtype=torch.long)
    preds = [torch.empty(0, dtype=torch.long)]
    for i in range(0, len(feats), chunk):
        logits = method.logits(feats.x[i : i + chunk]).cpu()
        preds.append(logits.argmax(-1) if keep is None else keep[logits[:, keep].argmax(-1)])
    preds = dist.gather_cat(torch.cat(preds))
    correct = (preds == y).float()
    per_class = [correct[y == c].mean().item() for c in torch.unique(y)]
    return {"top1": round(100 * correct.mean().item(), 4), "mean_per_class": round(100 * sum(per_class) / len(per_class), 4), "n": len(y)}


# --------------------------------------------------------------------- train / eval
def run(cfg: DictConfig, run_dir: Path, mode: str = "train") -> dict:
    """Train (or only evaluate) one config in ``run_dir``; returns the results record."""
    check_backbone(cfg)
    if dist.env_world_size() > 1:  # under torchrun: join the process group (once per process)
        dist.init(select_device(cfg.device))
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
            if dist.is_main():
                print(f"[promptdg] skipped: {run_dir} already finished with this config (force=true reruns it)")
            return old
    signum = 0
    _STOP.install()  # preemption signals only set a flag while the run trains (see "Preemption and requeue")
    try:
        with _run_lock(run_dir):
            try:
                record = _run_locked(cfg, run_dir, chash, mode)
            except Preempted as e:
                _STOP.deferring = True  # a further signal does not interrupt the record
                if dist.is_main():
                    preempted = _base_record(cfg, run_dir, chash) | {
                        "status": "preempted",
                        "error": f"stopped by {e.signame} at a checkpoint; rerun the same command to resume",
                    }
                    write_json_atomic(results_path, preempted)
                raise
            except BaseException as e:
                if dist.is_main():
                    failed = _base_record(cfg, run_dir, chash) | {
                        "status": "failed",
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    }
                    write_json_atomic(results_path, failed)
                raise
        if dist.is_main():
            write_json_atomic(results_path, record)
        signum = _STOP.agreed()  # a signal during the final evaluation: the run is finished, the process still stops
    except Preempted as e:
        signum = e.signum
    finally:
        received, previous = _STOP.signum, _STOP.restore()
    if signum:
        _chain_and_exit(signum, received, previous)
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
        lock = run_lock(run_dir)
    except RunLocked as e:
        dist.broadcast(str(e))
        raise
    dist.broadcast(None)
    try:
        yield
    finally:
        lock.release()


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
    with dist.main_first("preparing the dataset and the backbone"):  # (generated / built on first use)
        if protocol != "fewshot":
            dataset_dir(cfg.dataset)  # a missing dataset fails before any model is loaded
        names = _class_names(cfg.dataset)  # (a few-shot dataset's split file: read here, before any model)
        backbone = ClipBackbone.from_config(cfg.backbone, device=device)
    cache = FeatureCache(cfg.cache_root, num_workers=cfg.num_workers)
    record = _base_record(cfg, run_dir, chash) | {"protocol": protocol, "shots": cfg.get("shots")}
    record.update(target_domains=[], source_domains={}, accuracy={}, mean_per_class_accuracy={}, val_accuracy={}, recovered=[])
    timings = {"train_s": 0.0, "eval_s": 0.0}
    main = dist.is_main()
    for split in splits:
        _stop_here()  # a preemption signal during the previous split's evaluation
        split_dir = run_dir / "splits" / split.dirname
        split_dir.mkdir(parents=True, exist_ok=True)
        done = split_dir / "result.json"
        if done.is_file():
            res = json.loads(done.read_text())
            if main:
                print(f"[promptdg] {split.target}: finished earlier, read back")
                checkpoints.remove(split_dir / "checkpoint.pt")  # (left by a stop just after the result)
        else:
            res = _run_split(cfg, method_cls, backbone, cache, names, split, split_dir, run_dir, device)
            if main:
                write_json_atomic(done, res)
                # the final model replaces the resume checkpoint once the split's result is on disk
                # (kept until then: a run stopped during the evaluation resumes after its last epoch)
                checkpoints.remove(split_dir / "checkpoint.pt")
            dist.barrier()
        tests = res["tests"] if "tests" in res else {split.key: res["test"]}
        for domain, test in tests.items():
            if main:
                print(f"[promptdg] {cfg.method.name} {cfg.dataset.name} target={domain}: top-1 {test['top1']:.1f}%")
            record["target_domains"].append(domain)
            record["source_domains"][domain] = split.sources
            record["accuracy"][domain] = test["top1"]
            record["mean_per_class_accuracy"][domain] = test["mean_per_class"]
        if res.get("val") is not None:
            record["val_accuracy"][split.key] = res["val"]["top1"]
        for k, v in res.get("extra", {}).items():  # counters of the method (DomainFusion: generated_images)
            record[k] = record.get(k, 0) + v
        record["recovered"] += res.get("recovered", [])  # unreadable checkpoints and generated images
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
    record["recovered"] += cache.recovered  # unreadable feature files computed again
    record["status"] = "finished"
    return record


def _stop_here() -> None:
    """A safe point outside training (before a split, before fit): stop if a preemption signal came."""
    signum = _STOP.agreed()
    if signum:
        raise Preempted(signum)


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
    with dist.main_first("extracting image features"):  # rank 0 fills the feature cache, the others read it
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
        with _STOP.deferred():  # a preemption signal stops at the method's next checkpoint
            method.fit({k: v for k, v in data.items() if k != "test"}, ctx)  # the target's labels stay here
        _stop_here()  # a signal after fit's last safe point
    train_s = time.time() - t
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    if state and dist.is_main():
        save_file(state, str(split_dir / "model.safetensors"))
    t = time.time()
    if "test" in data:  # DG / UDA / few-shot: the target domain or test split, loaded with the split
        subset = None
        if protocol == "fewshot":
            from .fewshot import class_subset

            subset = class_subset(cfg.dataset)  # ImageNet-A/R: predict among their 200 classes
        tests = {split.key: evaluate(method, data["test"], subset=subset)}
    else:
        with dist.main_first("extracting image features"):
            feats = {d: cache.domain_features(backbone, cfg.dataset, d) for d in split.tests}
        tests = {d: evaluate(method, f) for d, f in feats.items()}
    val = evaluate(method, data["val"]) if len(data.get("val") or ()) else None
    return {
        "target": split.target,
        "sources": split.sources,
        "tests": tests,
        "val": val,
        "n_train": len(data["train"]) if "train" in data else 0,
        "n_target_unlabelled": len(data["target"]) if "target" in data else 0,
        "extra": method.extra_results(),
        "recovered": ctx.recovered,
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
