"""Experiment tracking: ``logger=tensorboard | wandb | mlflow | csv`` (several: ``logger=[csv,wandb]``).

Each choice in ``conf/logger/`` adds one entry under the run config's ``logger`` key, its
``_target_`` naming a class of :mod:`promptdg_cli.tracking.backends` and the rest its settings
(lightning-hydra-template's layout). What every tracker receives, on rank 0 only:

* the composed config as hyper-parameters when the run starts (flattened ``method.lr`` keys; the
  class names and the preparation prose of the dataset left out) and the whole config as a file;
* per optimizer step of the training loop: ``<split>/train/<term>`` (each loss term, the mean over
  the global batch), ``<split>/train/total_loss`` (the weighted sum the step minimised) and
  ``<split>/train/lr``; per epoch, every number of the loop's ``metrics.jsonl`` line as
  ``<split>/epoch/<name>`` (the epoch's mean losses, ``val_acc``, the selected epoch), at the
  split's step count;
* the final record: ``test/<domain>``, ``test/avg`` (and ``test/mean_per_class/<domain>``,
  ``val/<split>``) and the record itself (as ``record.json``: ``promptdg collect`` reads every
  ``results.json`` below a folder).

``<split>`` is the split's key (the held-out domain; a UDA pair ``src_to_tgt``; ``all`` for a
source-free method). A tracker run is one promptdg run; runs whose configs differ only in the seed
share a *group* (:func:`group_name`: W&B's ``group``, MLflow's ``promptdg.group`` tag, TensorBoard's
folder). A run resumed after preemption continues its W&B and MLflow runs (their ids are kept in
``<run dir>/tracking.json``). Nothing here imports a tracker's library: each backend imports its own
when a run asks for it, and :func:`check` refuses a tracker whose extra is not installed before
anything loads. Torch-free.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from omegaconf import DictConfig

from ..config import plain_dict
from ..errors import ConfigError
from ..extras import require
from ..files import write_json_atomic
from .common import RunInfo, group_name, metric_key, numbers, record_metrics

__all__ = ["Trackers", "RunInfo", "active", "check", "group_name", "metric_key", "session"]
IDS_FILE = "tracking.json"
log = logging.getLogger("promptdg")
BACKENDS = "promptdg_cli.tracking.backends."


class Trackers:
    """The run's trackers as one: every call goes to each backend. Empty on ranks other than 0, but
    ``every_n_steps`` is the same on every rank (the loop's per-step values are summed over ranks)."""

    def __init__(self, backends: Sequence[Any] = (), every_n_steps: int = 0):
        self.backends = list(backends)
        self.every_n_steps = int(every_n_steps)  # 0: no per-step values

    def wants_step(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def metrics(self, values: Dict[str, Any], step: int, split: Optional[str] = None) -> None:
        clean = numbers(values)
        if clean:
            self._each("log_metrics", clean, step, split)

    def record(self, record: Dict[str, Any]) -> None:
        self._each("log_record", record, record_metrics(record))

    def close(self, status: str) -> None:
        self._each("close", status)

    def _each(self, what: str, *args) -> None:
        """Call every backend; one that fails is reported once and left out from then on: a tracker's
        error (a full disk, a store another job broke) never costs a run its results."""
        for b in list(self.backends):
            try:
                getattr(b, what)(*args)
            except Exception as e:
                log.warning(
                    "logger %s failed (%s: %s); the run goes on without it", type(b).__name__, type(e).__name__, e
                )
                self.backends.remove(b)


_ACTIVE: List[Trackers] = [Trackers()]  # the innermost session's trackers (TrainContext reads them)


def active() -> Trackers:
    return _ACTIVE[-1]


def _specs(cfg: DictConfig) -> Dict[str, Dict[str, Any]]:
    node = cfg.get("logger")
    if node is None:
        return {}
    specs = plain_dict(node, resolve=True)
    for name, spec in specs.items():
        target = spec.get("_target_", "") if isinstance(spec, dict) else ""
        if not target.startswith(BACKENDS):
            raise ConfigError(f"logger.{name}={spec!r} is not a tracker: each entry needs _target_: {BACKENDS}<class>. "
                              f"Valid choices: logger=tensorboard, wandb, mlflow, csv (conf/logger/)")
    return specs


def _backend_class(name: str, spec: Dict[str, Any]):
    from . import backends

    cls = getattr(backends, spec["_target_"][len(BACKENDS):], None)
    if cls is None:
        raise ConfigError(f"logger.{name}._target_={spec['_target_']!r} is not a tracker. Valid: "
                          + ", ".join(BACKENDS + c for c in backends.CLASSES))
    return cls


def check(cfg: DictConfig) -> None:
    """Refuse, before anything loads, a tracker that is not one or whose extra is not installed."""
    for name, spec in _specs(cfg).items():
        _require(name, _backend_class(name, spec))


def _require(name: str, cls) -> None:
    if cls.extra:
        require(cls.extra, f"logger={name}")


@contextmanager
def session(cfg: DictConfig, run_dir: Path, config_hash: str, main: bool = True) -> Iterator[Trackers]:
    """The run's trackers while it runs (rank 0: ``main``); closed with the run's outcome:
    finished, failed, or preempted (a ``SystemExit`` from the preemption handler)."""
    specs = _specs(cfg)
    every = min(
        (int(s.get("every_n_steps", 1)) for s in specs.values() if int(s.get("every_n_steps", 1)) > 0), default=0
    )
    if not specs or not main:
        trackers = Trackers([], every)
    else:
        ids_path = Path(run_dir) / IDS_FILE
        info = RunInfo(cfg, run_dir, config_hash, _resume_ids(run_dir, ids_path))
        built = []
        try:
            for name, spec in specs.items():
                cls = _backend_class(name, spec)
                _require(name, cls)
                settings = {k: v for k, v in spec.items() if k not in ("_target_", "every_n_steps")}
                built.append(cls(info, **settings))
                built[-1].log_hparams(info.hparams, info.config_yaml)
        except BaseException:
            for b in built:
                b.close("failed")
            raise
        write_json_atomic(ids_path, info.ids)
        trackers = Trackers(built, every)
    _ACTIVE.append(trackers)
    status = "failed"
    try:
        yield trackers
        status = "finished"
    except SystemExit as e:
        status = "preempted" if e.code not in (0, None) else "finished"
        raise
    finally:
        _ACTIVE.pop()
        trackers.close(status)


def _resume_ids(run_dir: Path, ids_path: Path) -> Dict[str, str]:
    """The tracker run ids of an earlier attempt that did not finish (preempted, failed): continued.
    A run that finished and is run again (force=true) starts new tracker runs."""
    try:
        finished = json.loads((Path(run_dir) / "results.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        finished = False
    try:
        return {} if finished else dict(json.loads(ids_path.read_text()))
    except (OSError, ValueError):
        return {}
