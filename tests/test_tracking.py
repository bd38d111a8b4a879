"""logger=tensorboard | mlflow | wandb | csv: a tiny `promptdg train method=coop` run, read back with
each library's own reader. The references come from the run's other files (the split's training
set size, metrics.jsonl, results.json) and from CoOp's schedule written out by hand."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import results

EPOCHS, BATCH = 2, 32
# (select=val: each epoch is scored)
COOP = ("method=coop", f"method.epochs={EPOCHS}", "target=sketch", "method.select=val")
# CoOp's rate, by hand: one constant warm-up epoch at warmup_lr, then the cosine restarted at 0 (so the
# second epoch runs at the full lr: 0.5 * 0.002 * (1 + cos(0)))
LR = {0: 1e-5, 1: 0.002}


def _run(run_cli, *extra):
    code, out, err, out_root = run_cli("train", *COOP, *extra)
    assert code == 0, err
    return out_root, results(out_root)


def _steps_per_epoch(rec) -> int:
    n_train = json.loads((Path(rec["run_dir"]) / "splits" / "sketch" / "result.json").read_text())["n_train"]
    return n_train // BATCH  # CoOp's loader drops the last incomplete batch


def _epoch_lines(rec):
    lines = [json.loads(l) for l in (Path(rec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if "epoch" in l]


def _check_steps(steps: dict, rec) -> None:
    """steps: global step -> {"loss": .., "lr": ..}. One value per optimizer step; each epoch's mean
    loss is the one metrics.jsonl has (summed there, step by step here); the rate is CoOp's."""
    per_epoch = _steps_per_epoch(rec)
    assert sorted(steps) == list(range(1, EPOCHS * per_epoch + 1))
    for line in _epoch_lines(rec):
        epoch = int(line["epoch"])
        mine = [steps[s] for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)]
        assert sum(v["loss"] for v in mine) / per_epoch == pytest.approx(line["loss"], rel=1e-6)
        assert all(v["lr"] == pytest.approx(LR[epoch]) for v in mine)


def test_tensorboard_event_files_hold_steps_epochs_hparams_and_the_record(run_cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out_root, (rec,) = _run(run_cli, "logger=tensorboard")
    (events,) = (out_root / "tensorboard").rglob("events.out.tfevents.*")
    group = events.parent.parent.relative_to(out_root / "tensorboard").as_posix()
    assert events.parent.name == "seed1" and group.startswith("demo_digits/coop/demo_clip/sketch_")  # <group>/seed<k>
    acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("sketch/train/loss")}
    lr = {e.step: e.value for e in acc.Scalars("sketch/train/lr")}
    _check_steps({s: {"loss": loss[s], "lr": lr[s]} for s in loss}, rec)
    val = [e.value for e in acc.Scalars("sketch/epoch/val_acc")]
    assert val == pytest.approx([l["val_acc"] for l in _epoch_lines(rec)], abs=1e-4)
    assert acc.Scalars("test/sketch")[0].value == pytest.approx(rec["accuracy"]["sketch"], abs=1e-4)
    content = acc.PluginTagToContent("hparams")
    start = next(
        d
        for d in map(plugin_data_pb2.HParamsPluginData.FromString, content.values())
        if d.HasField("session_start_info")
    )
    hp = start.session_start_info.hparams
    assert hp["method.lr"].number_value == pytest.approx(0.002) and hp["seed"].number_value == 1
    assert hp["group"].string_value == group and hp["config_hash"].string_value == rec["config_hash"]
    assert "dataset.classes.0" not in hp  # class names are data, not hyper-parameters


def test_mlflow_file_store_holds_a_run_per_seed_grouped_by_config(run_cli):
    """Two seeds of one config: two MLflow runs of one group (TensorBoard's folder and W&B's group are
    the same name, tracking.group_name)."""
    from mlflow.tracking import MlflowClient

    out_root, recs = _run(run_cli, "logger=mlflow", "-m", "seed=1,2")
    client = MlflowClient(tracking_uri=(out_root / "mlruns").resolve().as_uri())  # MLflow's own file store reader
    experiment = client.get_experiment_by_name("promptdg")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["promptdg.group"] for r in runs}) == 1  # the seeds of one config: one group
    for run in runs:
        rec = next(r for r in recs if str(Path(r["run_dir"])) == run.data.tags["promptdg.run_dir"])
        assert run.data.params["method.lr"] == "0.002" and run.data.params["seed"] == str(rec["seed"])
        history = {
            k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"sketch/train/{k}")}
            for k in ("loss", "lr")
        }
        _check_steps({s: {"loss": history["loss"][s], "lr": history["lr"][s]} for s in history["loss"]}, rec)
        assert run.data.metrics["test/sketch"] == pytest.approx(rec["accuracy"]["sketch"])
        assert run.data.metrics["test/avg"] == pytest.approx(rec["avg_accuracy"])
        art = Path(client.download_artifacts(run.info.run_id, "record.json", str(out_root / f"dl{rec['seed']}")))
        logged = json.loads(art.read_text())
        assert logged["accuracy"] == rec["accuracy"] and logged["config_hash"] == rec["config_hash"]
        config = yaml.safe_load(
            Path(
                client.download_artifacts(run.info.run_id, "config.yaml", str(out_root / f"c{rec['seed']}"))
            ).read_text()
        )
        assert config["method"]["name"] == "coop" and config["seed"] == rec["seed"]


def test_wandb_offline_run_files_read_back_with_wandbs_reader(run_cli):
    out_root, (rec,) = _run(run_cli, "logger=wandb")
    (log,) = Path(rec["run_dir"]).glob("wandb/offline-run-*/run-*.wandb")
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb), "leet", "inspect", str(log), "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["telemetry"]["feature"]["offline"] is True  # never reached the network
    assert run["run_group"].startswith("demo_digits/coop/demo_clip/sketch_") and run["project"] == "promptdg"
    assert run["config"]["update"]["method"]["lr"] == 0.002 and run["config"]["update"]["seed"] == 1
    items = [r["history"]["item"] for r in records if r["type"] == "history"]
    steps = {
        int(i["sketch/step"]): {"loss": i["sketch/train/loss"], "lr": i["sketch/train/lr"]}
        for i in items
        if "sketch/train/loss" in i
    }
    _check_steps(steps, rec)
    summary = json.loads(
        subprocess.run(
            [str(wandb), "leet", "inspect", str(log), "--summary", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["summary"]["test/sketch"] == pytest.approx(rec["accuracy"]["sketch"])
    # synced with the run
    assert json.loads((log.parent / "files" / "record.json").read_text())["accuracy"] == rec["accuracy"]


def test_csv_metrics_load_into_pandas_and_hparams_are_the_config(run_cli):
    import pandas as pd

    out_root, (rec,) = _run(run_cli, "logger=csv")
    folder = Path(rec["run_dir"]) / "csv"
    df = pd.read_csv(folder / "metrics.csv")
    steps = df[df["sketch/train/loss"].notna()]
    _check_steps(
        {int(r.step): {"loss": r["sketch/train/loss"], "lr": r["sketch/train/lr"]} for _, r in steps.iterrows()}, rec
    )
    epochs = df[df["sketch/epoch/val_acc"].notna()]
    assert list(epochs["sketch/epoch/val_acc"]) == pytest.approx([l["val_acc"] for l in _epoch_lines(rec)])
    assert df["test/sketch"].dropna().tolist() == pytest.approx([rec["accuracy"]["sketch"]])
    config = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert config["method"]["lr"] == 0.002 and config["target"] == "sketch" and "logger" not in config


def test_a_tracker_that_is_not_installed_is_refused_naming_its_extra(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if `promptdg[tensorboard]` were not installed
    code, out, err, out_root = run_cli("train", *COOP, "logger=tensorboard")
    assert code == 2
    assert "logger=tensorboard" in err and "pip install 'promptdg[tensorboard]'" in err and "Traceback" not in err
    assert not list(out_root.rglob("results.json"))  # refused before the run started


def test_a_failing_tracker_costs_the_run_nothing(run_cli, monkeypatch):
    from promptdg_cli.tracking import backends

    def broken(self, *a):
        raise OSError("disk full")

    monkeypatch.setattr(backends.CSV, "log_metrics", broken)
    code, _, err, out_root = run_cli("train", "method=coop", "method.epochs=1", "target=sketch", "logger=csv")
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["status"] == "finished" and math.isfinite(rec["accuracy"]["sketch"])
    job_log = (Path(rec["run_dir"]) / "promptdg_train.log").read_text()
    # said once, then left out
    assert job_log.count("logger CSV failed (OSError: disk full); the run goes on without it") == 1


def test_other_ranks_have_no_tracker_but_the_same_step_schedule():
    from promptdg_cli.config import compose_run
    from promptdg_cli.tracking import session

    cfg = compose_run("logger=[csv,wandb]", "logger.csv.every_n_steps=4", "logger.wandb.every_n_steps=2")
    with session(cfg, Path("/nonexistent"), "h", main=False) as trackers:
        assert trackers.backends == [] and trackers.every_n_steps == 2  # the finest schedule asked for
        assert [s for s in range(1, 9) if trackers.wants_step(s)] == [2, 4, 6, 8]


def test_a_resumed_run_continues_its_tracker_runs_and_a_rerun_starts_new_ones(tmp_path):
    from promptdg_cli.tracking import _resume_ids

    ids = tmp_path / "tracking.json"
    ids.write_text(json.dumps({"wandb": "abc", "mlflow": "123"}))
    for status, expected in (
        ("preempted", {"wandb": "abc", "mlflow": "123"}),
        ("failed", {"wandb": "abc", "mlflow": "123"}),
        ("finished", {}),
    ):
        (tmp_path / "results.json").write_text(json.dumps({"status": status}))
        assert _resume_ids(tmp_path, ids) == expected
