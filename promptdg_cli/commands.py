"""The Hydra task functions behind ``promptdg train``, ``eval`` and ``generate``.

In a sweep (``-m``) a failed job does not stop the sweep: its error is recorded (``results.json``
with ``status: failed``, written by the engine, or here when the run failed before the engine
wrote anything), the other jobs run, and ``promptdg`` exits non-zero at the end with
"N of M runs failed: <run dirs>". The jobs tell the submitting process what they did through one
small JSON file each in ``<sweep dir>/.promptdg/sweeps/<sweep id>/`` (the :class:`SweepReport`
callback makes the folder; the jobs find it through ``$PROMPTDG_SWEEP_REPORT``), which works for
every launcher: in-process (Hydra's default), local processes and Slurm jobs (submitit).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import check_ranges, config_hash, method_schema_of, register_resolvers, typed_method
from .errors import UserError
from .files import write_json_atomic
from .record import RunRecord, Status
from .tracking import check as check_trackers

log = logging.getLogger("promptdg")

# A job of a submitit sweep runs in a fresh process that unpickles this module's task functions:
# the run-key resolver of hydra.sweep.subdir must exist there too.
register_resolvers()

SWEEP_REPORT_ENV = "PROMPTDG_SWEEP_REPORT"


def _multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _guard(fn, cfg: DictConfig, record_failure: bool = False):
    """Errors caused by the user's input are printed as one clear message, not a traceback.

    In a sweep, every error of the job is caught: recorded in the run directory and in the sweep's
    report, printed, and the sweep goes on (``promptdg`` exits non-zero at the end).
    ``record_failure``: the job's run directory is its own (train, eval without run_dir), so a
    failure that left no ``results.json`` there gets one.
    """
    if not _multirun():
        try:
            return fn(cfg)
        except UserError as e:
            print(f"promptdg: error: {e}", file=sys.stderr)
            sys.exit(2)
    run_dir = _run_dir()
    skipped = record_failure and _finished_earlier(cfg, run_dir)
    _report_job(run_dir, "running")
    try:
        out = fn(cfg)
    except Exception as e:  # KeyboardInterrupt / SystemExit (a requeue) still end the job
        error = f"{type(e).__name__}: {e}"
        if record_failure:
            _write_failed_record(cfg, run_dir, e)
        if isinstance(e, UserError):
            print(f"promptdg: error: {run_dir}: {e}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"promptdg: error: {run_dir}: {error}", file=sys.stderr)
        _report_job(run_dir, "failed", error)
        return None
    _report_job(run_dir, "skipped" if skipped else "finished")
    return out


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _finished_earlier(cfg: DictConfig, run_dir: Path) -> bool:
    """The engine will skip this run: a finished results.json of the same config (and no force)."""
    try:
        old = json.loads((run_dir / "results.json").read_text())
        return old.get("status") == "finished" and old.get("config_hash") == config_hash(cfg) and not cfg.force
    except Exception:  # no record, an unreadable one, a config that does not resolve
        return False


def _write_failed_record(cfg: DictConfig, run_dir: Path, exc: BaseException) -> None:
    """A ``status: failed`` results.json for a run that failed before the engine wrote one (a
    refused backbone, ...), so that ``collect`` lists it. Never over an existing record, and never
    in a directory another process holds (its ``.lock``)."""
    path = run_dir / "results.json"
    if path.exists() or (run_dir / ".lock").exists():
        return
    try:
        def get(key, default=None):
            return OmegaConf.select(cfg, key, default=default)

        try:
            chash = config_hash(cfg)
        except Exception:
            chash = None
        RunRecord(
            status=Status.FAILED,
            method=get("method.name"),
            variant=get("method.variant", ""),
            dataset=get("dataset.name"),
            backbone=get("backbone.name"),
            model=get("backbone.model"),
            pretrained=str(get("backbone.pretrained")),
            protocol=get("dataset.protocol"),
            seed=get("seed"),
            domains=list(get("dataset.domains") or []),
            target_domains=[cfg.target] if get("target") else [],
            config_hash=chash,
            run_dir=str(run_dir),
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        ).write(path)
    except Exception as e:  # recording must never hide the job's own error (a RecordError included)
        log.warning("could not write a failed record in %s: %s", run_dir, e)


# --------------------------------------------------------------------- sweep report
class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/train.yaml): at the start of a sweep, in the
    submitting process, makes the folder where each job reports its outcome and exports its path
    in ``$PROMPTDG_SWEEP_REPORT`` (inherited by local processes and by Slurm jobs, whose sbatch
    exports the submitting environment). ``promptdg`` reads it when the sweep returns."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir)).resolve() / ".promptdg" / "sweeps"
        folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[SWEEP_REPORT_ENV] = str(folder)
        _SWEEP["report"] = folder


_SWEEP: dict = {"report": None}  # the submitting process's current sweep report folder


def _report_job(run_dir: Path, status: str, error: Optional[str] = None) -> None:
    folder = os.environ.get(SWEEP_REPORT_ENV)
    if not folder or not Path(folder).is_dir():
        return
    hc = HydraConfig.get()
    entry = {
        "job": hc.job.num,
        "run_dir": str(run_dir),
        "overrides": list(hc.overrides.task),
        "status": status,
        "error": error,
        "host": os.uname().nodename,
        "pid": os.getpid(),
    }
    path = Path(folder) / f"job{hc.job.num:06d}.json"
    try:
        write_json_atomic(path, entry)
    except OSError as e:
        log.warning("could not write the sweep report %s: %s", path, e)


def start_sweep_report() -> Optional[str]:
    """Before a sweep: forget any previous report (returns the environment's old value)."""
    _SWEEP["report"] = None
    return os.environ.pop(SWEEP_REPORT_ENV, None)


def finish_sweep_report(previous_env: Optional[str]) -> Optional[dict]:
    """After a sweep: read the jobs' outcomes, remove the report folder, restore the environment.

    Returns ``{"jobs": [...], "failed": [...], "counts": {...}}`` or None when no sweep ran
    (``--cfg``, ``--help``, a single run). A job that started but never reported its end (killed,
    preempted, still running) takes the status of its run's ``results.json`` when that says
    ``preempted`` or ``failed``, else ``unfinished``."""
    folder = _SWEEP["report"]
    _SWEEP["report"] = None
    if previous_env is None:
        os.environ.pop(SWEEP_REPORT_ENV, None)
    else:
        os.environ[SWEEP_REPORT_ENV] = previous_env
    if folder is None:
        return None
    jobs = []
    for f in sorted(folder.glob("job*.json")):
        try:
            jobs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):  # .promptdg/sweeps, .promptdg: if empty
        try:
            parent.rmdir()
        except OSError:
            break
    for job in jobs:
        if job["status"] == "running":
            try:
                rec = json.loads((Path(job["run_dir"]) / "results.json").read_text())
            except (OSError, ValueError):
                rec = {}
            job["status"] = rec.get("status") if rec.get("status") in ("preempted", "failed") else "unfinished"
            job["error"] = rec.get("error") if job["status"] == "failed" else None
    counts = {s: sum(j["status"] == s for j in jobs) for s in SUMMARY_STATES}
    return {"jobs": jobs, "failed": [j for j in jobs if j["status"] not in ("finished", "skipped")], "counts": counts}


SUMMARY_STATES = {  # a job's outcome -> its words in the summary line
    "finished": "finished",
    "skipped": "skipped (finished earlier)",
    "failed": "failed",
    "preempted": "preempted",
    "unfinished": "did not finish",
}


def print_sweep_summary(report: dict, stopped: int = 0) -> int:
    """One summary line (stdout), or the runs that did not finish (stderr); returns the exit code
    (1 when one failed or did not finish). ``stopped``: the sweep itself ended with this exit code."""
    jobs, failed, c = report["jobs"], report["failed"], report["counts"]
    if not jobs:
        return 0
    parts = [f"{c[s]} {words}" for s, words in SUMMARY_STATES.items() if c[s] or s == "finished"]
    line = f"[promptdg] sweep of {len(jobs)} run{'s' if len(jobs) != 1 else ''}: {', '.join(parts)}"
    if stopped:
        line += f" (the sweep stopped early, exit code {stopped}: runs that never started are not counted)"
    if not failed:
        print(line)
        return 0
    print(line, file=sys.stderr)
    what = "failed" if all(j["status"] == "failed" for j in failed) else "failed or did not finish"
    print(f"promptdg: error: {len(failed)} of {len(jobs)} runs {what}:", file=sys.stderr)
    for j in failed:
        if j["status"] == "failed":
            why = (j.get("error") or "failed").splitlines()[0][:300]
        elif j["status"] == "preempted":
            why = "preempted (a checkpoint is saved: rerun to resume)"
        else:
            why = "did not finish (killed, or still running)"
        print(f"  {j['run_dir']}  [{' '.join(j.get('overrides') or [])}]: {why}", file=sys.stderr)
    print("promptdg: each failed run holds results.json with its error; rerun the same command to retry "
          "the runs that did not finish (finished runs are skipped)", file=sys.stderr)
    return 1


# --------------------------------------------------------------------- the commands

def check_config(cfg: DictConfig) -> None:
    """Every value checked before any heavy library loads (a built-in method's schema is torch-free;
    an outside method's class is imported for its ``Config``): the method's keys and types against its
    schema, and the ranges of the schemas (``config.py``)."""
    schema = method_schema_of(cfg.method)
    typed_method(cfg.method, schema)
    check_ranges(cfg, schema)
    check_trackers(cfg)  # logger=...: a tracker whose extra is not installed is refused here


def train(cfg: DictConfig) -> float:
    def _train(c):
        check_config(c)
        from .runner import run  # torch and open_clip load here, after the config was checked

        return run(c, _run_dir(), mode="train").avg_accuracy

    return _guard(_train, cfg, record_failure=True)


def eval(cfg: DictConfig) -> float:  # noqa: A001 - the subcommand's name
    def _eval(c):
        check_config(c)
        if not c.run_dir:
            from .runner import run

            return run(c, _run_dir(), mode="eval").avg_accuracy
        from .reevaluate import reevaluate

        src = Path(c.run_dir).resolve()
        # one folder per evaluated run: re-evaluating several runs on one dataset never collides
        out = (
            _run_dir()
            / "evaluated"
            / "-".join(p.name for p in (src.parent.parent.parent, src.parent.parent, src.parent, src))
        )
        return reevaluate(c, src, out).avg_accuracy

    return _guard(_eval, cfg, record_failure=not cfg.run_dir)


def generate(cfg: DictConfig) -> None:
    def _generate(c):
        check_config(c)
        from .generate import generate as write_generated

        return write_generated(c, _run_dir())

    return _guard(_generate, cfg)
