"""The training loop, written once, and what a method's ``fit`` may use (:class:`TrainContext`).

A method supplies its part of the paper and nothing of the plumbing (``methods/base.py``):

* ``parameters_to_train()`` and ``optimizer(params)``: what is learned and how;
* ``epoch_batches(epoch, g)``: the epoch's global batches, drawn from ``g``, a generator seeded by
  (seed, epoch), so every rank draws the same batches and a resumed epoch the same ones;
* ``load(epoch, batches)``: what a step needs of its part of each batch (images loaded, features
  looked up); the batches themselves by default;
* ``batch_loss(item, info)``: the paper's loss as :class:`Term` s, each the mean over the step's
  items with how many items it covers; ``loss_terms`` names them all (a step may leave some out);
* ``lr(epoch, step, steps)``, ``validate()``, ``on_epoch(epoch, ctx)`` (a hook per round:
  DomainFusion's augmentation), ``extra_state()`` / ``load_extra_state()``.

The loop (:meth:`TrainContext.train`) does the rest for every method: the seeded order, data
parallelism under torchrun (every rank takes its contiguous part of each global batch; a term's loss
is weighted by the rank's share of the batch, its count over the sum of the counts, and the
gradients are summed over ranks, so the update is the single-process one, uneven last batches
included; a rank whose part of a batch is empty adds nothing and calls no method hook), a preemption
check at every step boundary, model selection (``method.select``: last | val | target_test), one
checkpoint layout (a mid-epoch checkpoint carries the step index; the resumed epoch skips the steps
done), mixed precision (each step's ``batch_loss`` under ``devices.autocast`` of the run's
``backbone.precision``: bf16/fp16 on CUDA, nothing on the CPU; parameters and their updates stay
fp32; fp16 adds loss scaling, :class:`AmpStep`, whose state is in the checkpoint), metrics
(``metrics.jsonl`` per epoch; with ``logger=...`` also each step's loss terms and rate to the run's
trackers, ``tracking/``; a step's values stay on the device, summed there, so a step waits on no
``.item()``) and a progress bar. Rank 0 alone writes files.

:meth:`TrainContext.units` runs a resumable sequence of small jobs (PromptStyler's styles, the
linear probe's C values) with a checkpoint after each; :meth:`TrainContext.files` produces a list
of files resumably, shared out over the ranks (DomainFusion's augmentation rounds).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoints, devices, dist, seeds, tracking
from .evaluation import accuracy
from .preemption import STOP, Preempted

log = logging.getLogger("promptdg")
TOTAL = "__total"  # the weighted sum of a step's terms, tracked next to them


@dataclass
class Term:
    """One term of a step's loss: ``loss`` is the mean over the step's ``n`` items it covers (None
    when it covers none); ``weight`` its factor in the loss (0: logged only). Its name is one of the
    method's ``loss_terms``."""

    name: str
    loss: Optional[torch.Tensor]
    n: int
    weight: float = 1.0


@dataclass
class StepInfo:
    epoch: int
    step: int


def dassl_lr(
    step: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float, warmup: str = "constant"
) -> float:
    """The learning rate at scheduler step ``step`` of Dassl's schedule, as the official CoOp, DAPL and
    DAPT code builds it (``build_lr_scheduler``: CosineAnnealingLR(T_max=epochs) behind a warm-up
    wrapper, WARMUP_RECOUNT=True):

    * steps ``< warmup_epochs``: ``warmup_lr`` (constant warm-up; a linear one starts at
      ``warmup_lr`` and rises as lr·step/warmup_epochs);
    * then the cosine restarts its count at 0: ``lr · (1 + cos(π (step − warmup_epochs) / epochs)) / 2``.

    So with one warm-up epoch, epoch 1 runs at the full rate and the last epoch is not at 0. Past
    ``epochs`` steps (DAPL's official trainer steps the scheduler once per batch) the cosine goes on
    periodically, as PyTorch's CosineAnnealingLR does: the rate goes back up.
    """
    if step < warmup_epochs:
        return warmup_lr if (warmup == "constant" or step == 0) else lr * step / warmup_epochs
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup_epochs) / epochs))


class AmpStep:
    """An optimiser step under the run's mixed precision: the forward's autocast (bf16/fp16 on CUDA,
    nothing on the CPU) and, for fp16, loss scaling (``torch.amp.GradScaler``): the loss is scaled up
    before the backward (fp16 gradients would underflow: DAPT's lr 20 comes with tiny ones), the
    gradients are unscaled after they were summed over ranks (every rank sees the same sums, so all
    skip together) and before the step, a step whose gradients hold an inf or NaN is skipped and the
    scale halved (doubled after 2,000 good steps). bf16 has fp32's range and needs none. On the CPU
    fp16 means fp32 arithmetic with the scaling (which then changes no number but shows the path)."""

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, str(precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.skipped = 0  # steps skipped on an inf/NaN gradient
        if self.scaler is not None:
            # (the scale exists before a step, even one without a loss here)
            self.scaler.scale(torch.zeros((), device=device))

    def autocast(self):
        return devices.autocast(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, opt: torch.optim.Optimizer) -> bool:
        """Unscale, step unless a gradient is not finite, update the scale; whether the step was taken."""
        if self.scaler is None:
            opt.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        taken = self.scaler.get_scale() >= before  # (the scale only shrinks after a skipped step)
        self.skipped += not taken
        return taken

    def state_dict(self) -> Optional[dict]:
        return None if self.scaler is None else {**self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            state = dict(state)
            self.skipped = int(state.pop("skipped", 0))
            self.scaler.load_state_dict(state)


def order_batches(order: torch.Tensor, batch_size: int, drop_last: bool) -> List[torch.Tensor]:
    """``order`` cut into batches; ``drop_last`` drops the last incomplete one when there is a full one
    (Dassl's training loaders, which the official CoOp, DAPL and DAPT code use)."""
    n = len(order)
    end = (n // batch_size) * batch_size if (drop_last and n >= batch_size) else n
    return [order[i : i + batch_size] for i in range(0, end, batch_size)]


def shuffled_batches(n: int, batch_size: int, g: torch.Generator, drop_last: bool = False) -> List[torch.Tensor]:
    """The epoch's batches of indices 0..n-1 in the order ``torch.randperm(n, generator=g)``."""
    return order_batches(torch.randperm(n, generator=g), batch_size, drop_last)


def _shard(batch):
    """This rank's part of a global batch (a tensor, or a tuple of tensors each sharded)."""
    return tuple(dist.shard(b) for b in batch) if isinstance(batch, tuple) else dist.shard(batch)


def _empty(batch) -> bool:
    """No item in this rank's part of a batch (every tensor of a tuple empty)."""
    return all(len(b) == 0 for b in batch) if isinstance(batch, tuple) else len(batch) == 0


class TrainContext:
    """One split's training: its folder, seed and device, the checkpoint, metrics and the loop."""

    def __init__(
        self, run_dir: Path, split_dir: Path, target: str, seed: int, device: torch.device, selection_set=None
    ):
        self.run_dir, self.split_dir, self.target = Path(run_dir), Path(split_dir), target
        self.seed, self.device = seed, device
        # method.select=target_test only (an opt-in for parity with official code that selects on test labels):
        # the labelled test set whose accuracy selects the epoch
        self.selection_set = selection_set
        self.ckpt = self.split_dir / "checkpoint.pt"
        self.tracker = tracking.active()  # logger=...: the run's trackers (none: every call is a no-op)
        self.global_step = 0  # optimizer steps of this split (kept in the checkpoint): the trackers' x axis
        self._lines = 0
        self._state: Optional[Dict[str, Any]] = None  # the checkpoint's sections, read once
        self.recovered: list = []  # unreadable files recovered from (checkpoints.py, recovery.py)

    # ----------------------------------------------------------------- checkpoint (one file, sections)
    def checkpoint(self, section: str) -> Optional[dict]:
        if self._state is None:
            # rank 0 reads first (and repairs), the others after it; no rank saves before every rank
            # has read, so all ranks resume from the same state (the first read is at the same point of
            # the code on every rank)
            for turn in (True, False):
                if dist.is_main() == turn:
                    state, events = checkpoints.load(self.ckpt, self.device, repair=turn)
                dist.barrier()
            self.recovered += events  # a checkpoint that cannot be read: its previous one, or a restart
            self._state = state or {}
            if state:
                log.info("resuming %s from its checkpoint (%s)", self.target, ", ".join(self._state))
        return self._state.get(section)

    def _save(self, section: str, state: dict) -> None:
        self.checkpoint(section)  # (reads the file once, so the other sections are kept)
        assert self._state is not None  # (checkpoint() has read it)
        self._state[section] = state
        if dist.is_main():
            checkpoints.save(self._state, self.ckpt)  # verified, the previous one kept until then
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is on disk

    def stop_point(self, section: Optional[str] = None, state: Optional[Callable[[], dict]] = None) -> None:
        """A step boundary: if a preemption signal came (agreed by all ranks), save ``state()`` as
        ``section`` and stop with :class:`Preempted`."""
        signum = STOP.agreed()
        if not signum:
            return
        if section is not None and state is not None:
            self._save(section, state())
        log.warning(
            "%s: stopping at a checkpoint after %s; rerun the same command to resume",
            self.target,
            signal.Signals(signum).name,
        )
        raise Preempted(signum)

    # ----------------------------------------------------------------- records and progress
    def log(self, **metrics) -> None:
        if not dist.is_main():
            return
        line = {"time": round(time.time(), 3), "target": self.target, **metrics}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line, default=float) + "\n")
        self._lines += 1  # (a method's own lines before the loop, e.g. the linear probe's C values: at their count)
        self.tracker.metrics({tracking.metric_key(self.target, "epoch", k): v for k, v in metrics.items()},
                             self.global_step or self._lines, self.target)

    def _track_step(self, values: Dict[str, float], lr: float) -> None:
        """One optimizer step for the trackers: each term (the global batch mean), their weighted sum, the rate."""
        out = {tracking.metric_key(self.target, "train", k): v for k, v in values.items() if k != TOTAL}
        out[tracking.metric_key(self.target, "train", "total_loss")] = values[TOTAL]
        out[tracking.metric_key(self.target, "train", "lr")] = lr
        self.tracker.metrics(out, self.global_step, self.target)

    @staticmethod
    def progress(iterable, desc: str, **kw):
        return tqdm(iterable, desc=desc, unit="it", leave=False, dynamic_ncols=True, disable=not dist.is_main(), **kw)

    # ----------------------------------------------------------------- the loop
    def train(self, m) -> None:
        """Train method ``m`` for ``m.rounds()`` epochs (see the module docstring)."""
        cfg = m.cfg
        params = m.parameters_to_train()
        opt = m.optimizer(params)
        # autocast, fp16's scaling
        amp = AmpStep(self.device, str(getattr(getattr(m, "env", None), "precision", "fp32")))
        epochs = m.rounds()
        select = str(getattr(cfg, "select", "last"))
        best: Dict[str, Any] = {"acc": -1.0, "epoch": -1, "params": [p.detach().clone() for p in params]}
        state = self.checkpoint("loop")
        start, done, resumed = 0, 0, {}
        if state is not None:
            for p, v in zip(params, state["params"]):
                p.data.copy_(v)
            opt.load_state_dict(state["optimizer"])
            best = state["best"]
            m.load_extra_state(state.get("extra"))
            # (fp16: the loss scale, so a resumed run skips where an uninterrupted one does)
            amp.load_state_dict(state.get("amp"))
            start, done = (
                (int(state["epoch"]), int(state["step"])) if state.get("step") else (int(state["epoch"]) + 1, 0)
            )
            resumed = dict(state.get("sums", {})) if done else {}
            self.global_step = int(state.get("global_step", 0))
        dist.broadcast_params(params)  # every rank starts from rank 0's values

        def snapshot(epoch, step, sums):
            return {
                "epoch": epoch,
                "step": step,
                "params": [p.detach() for p in params],
                "optimizer": opt.state_dict(),
                "best": best,
                "extra": m.extra_state(),
                "sums": sums,
                "global_step": self.global_step,
                "amp": amp.state_dict(),
            }

        for epoch in self.progress(range(start, epochs), desc=f"{cfg.name} epochs", initial=start, total=epochs):
            m.on_epoch(epoch, self)
            g = seeds.generator("epoch-order", self.seed, epoch)
            batches = m.epoch_batches(epoch, g)
            first = done if epoch == start else 0
            base = resumed if first else {}
            # this rank's part since (re)start, summed over steps (float64 on the device: no sync a step)
            sums: Dict[str, Any] = {n: 0.0 for n in m.loss_terms}
            lr = None
            local = [_shard(b) for b in batches[first:]]
            items = iter(m.load(epoch, [b for b in local if not _empty(b)]))  # (a rank's empty parts are not loaded)
            for step, part in enumerate(local, start=first):
                lr = m.lr(epoch, step, len(batches))
                if lr is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr
                terms: Dict[str, Term] = {}
                if not _empty(part):
                    with amp.autocast():  # backbone.precision on CUDA; nothing on the CPU
                        terms = {t.name: t for t in m.batch_loss(next(items), StepInfo(epoch, step))}
                    unknown = set(terms) - set(m.loss_terms)
                    if unknown:
                        raise ValueError(
                            f"{type(m).__name__}.batch_loss returned terms {sorted(unknown)} "
                            f"not in its loss_terms {m.loss_terms}"
                        )
                # every rank: the items each term covers, summed over ranks (one collective, in loss_terms'
                # order; host numbers)
                counts = [terms[n].n if n in terms and terms[n].loss is not None else 0 for n in m.loss_terms]
                totals = (
                    counts
                    if dist.world() == 1
                    else [int(v) for v in dist.all_sum(np.asarray(counts, dtype=np.float64))]
                )
                loss, values = None, {}
                for name, n_all in zip(m.loss_terms, totals):
                    t = terms.get(name)
                    if t is None or t.loss is None or not t.n:
                        continue
                    share = t.loss * (t.n / n_all) if dist.world() > 1 else t.loss  # its part of the batch mean
                    # (the float .item() gave, kept on the device: no read a step)
                    values[name] = share.detach().double()
                    values[TOTAL] = values.get(TOTAL, 0.0) + t.weight * values[name]
                    sums[name] = sums[name] + values[name]
                    loss = t.weight * share if loss is None else loss + t.weight * share
                if sum(totals):  # a step with no item anywhere (all unreadable) changes nothing
                    opt.zero_grad(set_to_none=True)
                    if loss is not None and loss.requires_grad:
                        amp.backward(loss)
                    dist.sync_grads(params)
                    amp.step(opt)
                self.global_step += 1
                if self.tracker.wants_step(self.global_step):  # (the same on every rank: a collective under torchrun)
                    self._track_step(
                        _all_sum({n: values.get(n, 0.0) for n in (*m.loss_terms, TOTAL)}), opt.param_groups[0]["lr"]
                    )
                self.stop_point("loop", lambda: snapshot(epoch, step + 1, _add(base, _all_sum(sums))))
            total = _add(base, _all_sum(sums))
            # (so far: steps with an inf gradient)
            skipped = {} if amp.scaler is None else {"fp16_skipped_steps": amp.skipped}
            val = self._selection_score(m, select)
            val = None if val is None else dist.broadcast(val)  # every rank selects the same epoch
            if select == "last" or val is None or val > best["acc"]:
                best = {
                    "acc": val if val is not None else -1.0,
                    "epoch": epoch,
                    "params": [p.detach().clone() for p in params],
                }
            steps = max(len(batches), 1)
            self.log(
                epoch=epoch,
                lr=lr,
                **{k: v / steps for k, v in total.items()},
                **({} if val is None else {"val_acc": val}),
                **skipped,
            )
            self._save("loop", snapshot(epoch, 0, {}))
            self.stop_point()
        for p, v in zip(params, best["params"]):
            p.data.copy_(v)
        self.log(selected_epoch=best["epoch"], selected_val_acc=best["acc"])

    def _selection_score(self, m, select: str) -> Optional[float]:
        """The score that selects the epoch: none (the last epoch is kept), the method's validation
        accuracy, or the accuracy on ``selection_set`` (target_test)."""
        if select == "target_test":
            return accuracy(m, self.selection_set)
        return m.validate() if select == "val" else None

    # ----------------------------------------------------------------- resumable sequences
    def units(self, name: str, keys: Sequence, fn: Callable[[Any, dict], Any], desc: str) -> dict:
        """Run ``fn(key, done)`` for every key in order, ``done`` being the results so far; a
        checkpoint after each (so a stop between units loses nothing); returns {key: result}."""
        done = dict((self.checkpoint(f"units:{name}") or {}).get("results", {}))
        todo = [k for k in keys if k not in done]
        for key in self.progress(todo, desc=desc, initial=len(keys) - len(todo), total=len(keys)):
            done[key] = fn(key, done)
            self._save(f"units:{name}", {"results": done})
            self.stop_point()
        return {k: done[k] for k in keys}

    def files(self, outputs: Sequence[Path], make: Callable[[List[int]], None], batch_size: int, desc: str,
              is_done: Callable[[Path], bool] = Path.is_file) -> None:
        """Produce ``outputs`` batch by batch with ``make(indices)``, skipping batches whose files are
        all done (an interrupted run resumes from its files); under torchrun rank r makes batches
        r, r + world, ... (each file has one writer). A preemption signal stops after the batch in
        progress."""
        starts = [i for n, i in enumerate(range(0, len(outputs), batch_size)) if n % dist.world() == dist.rank()]
        todo = [i for i in starts if not all(is_done(Path(o)) for o in outputs[i : i + batch_size])]
        for i in self.progress(todo, desc=desc):
            if dist.world() == 1:
                self.stop_point()
            make(list(range(i, min(i + batch_size, len(outputs)))))
        if dist.world() > 1:
            dist.barrier()  # every rank reads the whole set next
            self.stop_point()


def make_files(outputs: Sequence[Path], make: Callable[[List[int]], None], batch_size: int, desc: str,
               is_done: Callable[[Path], bool] = Path.is_file) -> None:
    """One process's :meth:`TrainContext.files` outside training (``promptdg generate``): the batches
    whose files are not all done, with a progress bar."""
    todo = [
        i for i in range(0, len(outputs), batch_size) if not all(is_done(Path(o)) for o in outputs[i : i + batch_size])
    ]
    for i in tqdm(todo, desc=desc, unit="batch", dynamic_ncols=True):
        make(list(range(i, min(i + batch_size, len(outputs)))))


def _all_sum(sums: dict) -> dict:
    """Each value summed over ranks (one collective per name, in name order), as a float: a step's
    values stay on the device until here (a metrics line, a tracker's step, a checkpoint)."""
    return {k: float(dist.all_sum(v)) for k, v in sorted(sums.items())}


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in sorted(set(a) | set(b))}
