"""The trackers behind ``logger=...``: each imports its library when a run asks for it (``extra``
names the optional extra that installs it) and writes only local files unless told otherwise.

* :class:`TensorBoard`: event files under ``<save_dir>/<group>/seed<k>`` (torch's ``SummaryWriter``);
  the hyper-parameters as the HParams plugin's summaries, the config and the record as text.
* :class:`WandB`: a W&B run, ``mode=offline`` by default (files under ``<run dir>/wandb/``, uploaded
  later with ``wandb sync``); grouped by :func:`~promptdg_cli.tracking.group_name`; each split's
  metrics plotted against its own step (``define_metric``).
* :class:`MLflow`: a run of the tracking client in a local file store (``mlruns/``); the group,
  config hash and run folder as tags, the config and the record as artifacts.
* :class:`CSV`: ``<run dir>/csv/metrics.csv`` (one row per logged step, one column per metric;
  rewritten atomically when a new metric appears) and ``hparams.yaml``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from ..errors import ConfigError
from ..files import write_text_atomic
from .common import RunInfo, metric_key

CLASSES = ("TensorBoard", "WandB", "MLflow", "CSV")
STATUS_WORDS = ("finished", "failed", "preempted")


class TensorBoard:
    extra = "tensorboard"

    def __init__(self, run: RunInfo, save_dir: str, flush_secs: int = 120):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(save_dir) / run.group / f"seed{run.seed}"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=int(flush_secs))

    def log_hparams(self, hparams: Dict[str, Any], config_yaml: str) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(values, {}):  # experiment, session start, session end
            # (torch leaves file_writer typed None; SummaryWriter's __init__ opens it)
            self.writer.file_writer.add_summary(summary)  # type: ignore[attr-defined]
        self.writer.add_text("config", _code_block(config_yaml))

    def log_metrics(self, values: Dict[str, float], step: int, split: Optional[str]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_record(self, record: Dict[str, Any], metrics: Dict[str, float]) -> None:
        self.log_metrics(metrics, 0, None)
        self.writer.add_text("results", _code_block(json.dumps(record, indent=2, default=str)))

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class WandB:
    extra = "wandb"
    MODES = ("offline", "online", "disabled")

    def __init__(self, run: RunInfo, project: str = "promptdg", entity: Optional[str] = None,
                 mode: Literal["offline", "online", "disabled"] = "offline", save_dir: Optional[str] = None,
                 tags: Optional[List[str]] = None, job_type: str = "train"):
        if mode not in self.MODES:
            raise ConfigError(f"logger.wandb.mode={mode!r} is not valid. Valid: {', '.join(self.MODES)}")
        import wandb

        run_id = run.resume_ids.get("wandb") or secrets.token_hex(4)  # (W&B ids: letters and digits)
        folder = Path(save_dir) if save_dir else run.run_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            dir=str(folder),
            group=run.group,
            name=run.name,
            id=run_id,
            resume="allow",
            job_type=job_type,
            tags=list(tags or []),
            config=run.config,
            settings=wandb.Settings(console="off", silent=True),
        )
        run.ids["wandb"] = run_id
        self.step_metrics: set = set()

    def log_hparams(self, hparams: Dict[str, Any], config_yaml: str) -> None:
        self.run.config.update(
            {"group": hparams["group"], "config_hash": hparams["config_hash"]}, allow_val_change=True
        )

    def log_metrics(self, values: Dict[str, float], step: int, split: Optional[str]) -> None:
        if split is None:
            self.run.log(values)
            return
        axis = metric_key(split, "step")
        if axis not in self.step_metrics:  # each split's curves against its own optimizer step
            self.run.define_metric(axis)
            self.run.define_metric(metric_key(split) + "/*", step_metric=axis)
            self.step_metrics.add(axis)
        self.run.log({**values, axis: step})

    def log_record(self, record: Dict[str, Any], metrics: Dict[str, float]) -> None:
        self.run.summary.update(metrics)
        # (not named results.json: `promptdg collect` reads every results.json below a folder)
        # synced with the run
        write_text_atomic(Path(self.run.dir) / "record.json", json.dumps(record, indent=2, default=str))

    def close(self, status: str) -> None:
        if status == "preempted" and hasattr(self.run, "mark_preempting"):
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MLflow:
    extra = "mlflow"
    STATUS = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}

    def __init__(self, run: RunInfo, tracking_uri: str, experiment_name: str = "promptdg"):
        uri = _store_uri(str(tracking_uri))
        if uri.startswith("file:"):  # MLflow 3 asks for this opt-in before it writes a file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(experiment_name)
            except MlflowException:  # created by another job of the sweep meanwhile
                created = self.client.get_experiment_by_name(experiment_name)
                assert created is not None
                experiment_id = created.experiment_id
        else:
            experiment_id = experiment.experiment_id
        run_id = run.resume_ids.get("mlflow")
        try:
            resumed = run_id is not None and self.client.get_run(run_id) is not None
        except MlflowException:
            resumed = False
        if resumed and run_id is not None:  # (a resumed run has its id)
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {
                "promptdg.group": run.group,
                "promptdg.config_hash": run.config_hash,
                "promptdg.run_dir": str(run.run_dir),
                "promptdg.seed": str(run.seed),
            }
            run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        self.run_id: str = run_id
        run.ids["mlflow"] = self.run_id

    def log_hparams(self, hparams: Dict[str, Any], config_yaml: str) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in hparams.items()]
        try:
            for i in range(0, len(params), 100):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        except Exception:  # a resumed run: the same params are there already (MLflow refuses to log a param twice)
            if not self.client.get_run(self.run_id).data.params:
                raise
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log_metrics(self, values: Dict[str, float], step: int, split: Optional[str]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_record(self, record: Dict[str, Any], metrics: Dict[str, float]) -> None:
        self.log_metrics(metrics, 0, None)
        self.client.log_dict(self.run_id, record, "record.json")  # (not results.json: collect reads those)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[status])


class CSV:
    extra = ""  # the standard library's csv

    def __init__(self, run: RunInfo, save_dir: Optional[str] = None):
        self.folder = Path(save_dir) if save_dir else run.run_dir / "csv"
        self.path = self.folder / "metrics.csv"
        self.columns: List[str] = ["time", "split", "step"]
        self.rows: List[Dict[str, Any]] = []
        if self.path.is_file():  # a resumed run goes on with the rows of its earlier attempt
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or self.columns)
                self.rows = list(reader)

    def log_hparams(self, hparams: Dict[str, Any], config_yaml: str) -> None:
        write_text_atomic(self.folder / "hparams.yaml", config_yaml)

    def log_metrics(self, values: Dict[str, float], step: int, split: Optional[str]) -> None:
        row = {"time": round(time.time(), 3), "split": split or "", "step": step, **values}
        self.rows.append(row)
        new = [k for k in values if k not in self.columns]
        if new or not self.path.is_file():  # a new column: the whole file again, with it in the header
            self.columns += new
            write_text_atomic(self.path, _csv_text(self.columns, self.rows))
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    def log_record(self, record: Dict[str, Any], metrics: Dict[str, float]) -> None:
        self.log_metrics(metrics, 0, None)

    def close(self, status: str) -> None:
        pass


def _csv_text(columns: List[str], rows: List[Dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _store_uri(uri: str) -> str:
    """A path or a ``file:`` URI as the file URI of its absolute path; another scheme as given."""
    if "://" in uri and not uri.startswith("file:"):
        return uri
    path = uri[len("file:"):] if uri.startswith("file:") else uri
    path = path[2:] if path.startswith("//") else path
    return Path(path).expanduser().resolve().as_uri()


def _code_block(text: str) -> str:
    """Text shown as-is by TensorBoard's markdown text plugin (an indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())
