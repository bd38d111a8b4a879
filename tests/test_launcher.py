"""Sweeps at scale: the Slurm / local launcher configs and resource shapes, a sweep through
submitit's local launcher (separate processes), sweeps that resume and report failures, and
`collect` on hundreds of records."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from promptdg_cli import collect
from promptdg_cli.cli import main as cli_main
from promptdg_cli.config import ConfigError, conf_dir, config_hash, register_configs, register_resolvers

from conftest import results

REPO = Path(__file__).resolve().parents[1]
SLURM_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


@pytest.fixture
def hydra_ctx():
    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def job_config(cfg):
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


# --------------------------------------------------------------------- launcher configs
def test_slurm_launcher_with_a_resource_shape_composes(hydra_ctx, monkeypatch, tmp_path):
    cfg = compose("train", overrides=["hydra/launcher=slurm", "resources=gpu1", "hydra.launcher.partition=gpu",
                                      "hydra.launcher.account=proj42"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == SLURM_TARGET
    assert {k: launcher[k] for k in ("partition", "account", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                                     "mem_gb", "timeout_min", "signal_delay_s", "nodes")} == {
        "partition": "gpu", "account": "proj42", "gpus_per_node": 1, "tasks_per_node": 1, "cpus_per_task": 8,
        "mem_gb": 48, "timeout_min": 240, "signal_delay_s": 120, "nodes": 1}
    assert launcher["max_num_timeout"] > 0 and launcher["array_parallelism"] > 0
    assert launcher["qos"] is None and launcher["additional_parameters"] == {} and launcher["setup"] is None
    assert launcher["name"] == "promptdg_train" and launcher["submitit_folder"].endswith("/.submitit/%j")

    # the sbatch script submitit would submit for these settings (no Slurm here: srun is faked)
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    params = {k: v for k, v in launcher.items() if k != "_target_"}
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())  # the launcher's own renaming
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--account=proj42", "--gpus-per-node=1", "--ntasks-per-node=1",
                 "--cpus-per-task=8", "--mem=48GB", "--time=240", "--signal=USR2@120", "--job-name=promptdg_train"):
        assert f"#SBATCH {line}" in sbatch, line
    assert "srun" in sbatch and "--qos" not in sbatch


@pytest.mark.parametrize("launcher", ["slurm", "local"])
@pytest.mark.parametrize("shape,gpus", [("cpu", None), ("gpu1", 1), ("gpu4", 4)])
def test_resource_shapes_set_only_the_launcher(hydra_ctx, launcher, shape, gpus):
    """A resource shape changes hydra.launcher only: the run config, its hash and its run directory stay."""
    args = ["method=coop", "dataset=pacs", "backbone=vit_b16", "seed=2", "target=sketch"]
    plain = compose("train", overrides=args, return_hydra_config=True)
    shaped = compose(
        "train", overrides=args + [f"hydra/launcher={launcher}", f"resources={shape}"], return_hydra_config=True
    )
    assert shaped.hydra.launcher._target_ == {"slurm": SLURM_TARGET, "local": LOCAL_TARGET}[launcher]
    assert shaped.hydra.launcher.gpus_per_node == gpus and shaped.hydra.launcher.tasks_per_node == 1
    assert job_config(shaped) == job_config(plain)
    assert config_hash(shaped) == config_hash(plain)
    assert shaped.hydra.sweep.subdir == plain.hydra.sweep.subdir and shaped.hydra.run.dir == plain.hydra.run.dir
    # and without resources= the defaults list leaves the launcher as it was (Hydra's basic one)
    assert "resources" not in plain.hydra.launcher and plain.hydra.runtime.choices.resources is None


@pytest.mark.parametrize("alias,ours", [("submitit_local", "local"), ("submitit_slurm", "slurm")])
def test_the_plugins_launcher_names_are_promptdgs(hydra_ctx, alias, ours):
    """hydra/launcher=submitit_local|submitit_slurm (the plugin's names) compose to promptdg's local|slurm,
    resource shapes and overrides included; the plugin's own nodes failed to resolve their job name."""
    extra = ["resources=gpu1", "hydra.launcher.timeout_min=30"]
    got = compose("train", overrides=[f"hydra/launcher={alias}", *extra], return_hydra_config=True).hydra.launcher
    want = compose("train", overrides=[f"hydra/launcher={ours}", *extra], return_hydra_config=True).hydra.launcher
    got, want = OmegaConf.to_container(got, resolve=True), OmegaConf.to_container(want, resolve=True)
    assert got == want
    assert got["name"] == "promptdg_train" and got["timeout_min"] == 30 and got["gpus_per_node"] == 1
    assert got["_target_"] == {"local": LOCAL_TARGET, "slurm": SLURM_TARGET}[ours]
    if ours == "slurm":  # promptdg's defaults, not the plugin's (0 requeues, 256 jobs at once)
        assert got["max_num_timeout"] == 3 and got["array_parallelism"] == 64


def test_cfg_hydra_and_help_on_the_command_line(capsys):
    code = cli_main(["train", "hydra/launcher=slurm", "resources=gpu4", "hydra.launcher.partition=a100",
                     "method=coop", "--cfg", "hydra"])
    out = capsys.readouterr().out
    assert code == 0
    launcher = OmegaConf.create(out).hydra.launcher
    assert launcher._target_ == SLURM_TARGET and launcher.partition == "a100"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == (4, 1, 32)
    assert launcher.signal_delay_s == 120

    try:
        cli_main(["train", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "resources (job shape for a launcher, with -m): cpu, gpu1, gpu4" in out
    assert "hydra/launcher" in out and "slurm" in out and "local" in out
    cli_main(["--help"])
    assert "hydra/launcher=slurm resources=gpu1" in capsys.readouterr().out


# --------------------------------------------------------------------- submitit, local processes
def test_local_launcher_sweep_in_separate_processes_then_collect(run_cli, tmp_path):
    # fill the shared cache in this process first (tiny world + features): the two jobs only read it
    code, _, err, _ = run_cli("train", "method=zeroshot", "target=sketch", f"out_root={tmp_path / 'warm'}")
    assert code == 0, err
    t = time.time()
    code, out, err, out_root = run_cli(
        "train", "-m", "hydra/launcher=local", "method=zeroshot,zeroshot_name", "target=sketch"
    )
    elapsed = time.time() - t
    assert code == 0, err
    recs = results(out_root)
    assert sorted(r["variant"] for r in recs) == ["[class]", "a photo of a [class]."]  # zeroshot, zeroshot_name
    assert all(r["status"] == "finished" and r["accuracy"].keys() == {"sketch"} for r in recs)
    # each job ran in its own process (submitit's pickles and logs), found $PROMPTDG_CACHE (no cache
    # miss: the features warmed above) and wrote below $PROMPTDG_OUT
    jobs = list((out_root / ".submitit").glob("*/*_result.pkl"))
    assert len(jobs) == 2
    assert all(
        r["feature_cache"]["misses"] == 0 and Path(r["run_dir"]).parent.parent.parent.parent == out_root for r in recs
    )
    assert "[promptdg] sweep of 2 runs: 2 finished" in out
    assert not (out_root / ".promptdg").exists()  # the jobs' report folder is removed
    print(f"\n[local launcher] 2 jobs in {elapsed:.1f} s")

    code, out, err, _ = run_cli("collect", str(out_root), tiny=False)
    assert code == 0, err
    rows = [l for l in out.splitlines() if l.startswith("| zeroshot")]
    assert len(rows) == 2 and "Failed runs" not in out


def test_a_sweep_through_the_plugins_own_launcher_name(run_cli, tmp_path):
    """hydra/launcher=submitit_local runs like hydra/launcher=local: the jobs in their own processes, the
    same sweep report (it used to end in "InterpolationResolutionError: HydraConfig was not set")."""
    code, _, err, _ = run_cli("train", "method=zeroshot", "target=sketch", f"out_root={tmp_path / 'warm'}")
    assert code == 0, err
    t = time.time()
    code, out, err, out_root = run_cli(
        "train", "-m", "hydra/launcher=submitit_local", "method=zeroshot,zeroshot_name", "target=sketch"
    )
    elapsed = time.time() - t
    assert code == 0, err
    recs = results(out_root)
    assert sorted(r["variant"] for r in recs) == ["[class]", "a photo of a [class]."]
    assert all(r["status"] == "finished" for r in recs)
    assert len(list((out_root / ".submitit").glob("*/*_result.pkl"))) == 2  # two processes of submitit's
    assert "[promptdg] sweep of 2 runs: 2 finished" in out and "HydraConfig was not set" not in out + err
    summary = next(l for l in out.splitlines() if "sweep of" in l)
    print(f"\n[submitit_local sweep] 2 jobs in {elapsed:.1f} s: {summary}")


# --------------------------------------------------------------------- failures and reruns
def test_a_failed_job_is_recorded_and_the_sweep_goes_on(run_cli):
    """target=nope fails at run time (not at composition): the jobs after it still run, the failed
    one holds a failed record, and promptdg exits 1 naming it."""
    code, out, err, out_root = run_cli("train", "-m", "method=zeroshot", "target=sketch,nope,photo")
    assert code == 1
    recs = {r["run_dir"].rsplit("/", 1)[1].split("_")[1]: r for r in results(out_root)}
    assert set(recs) == {"sketch", "nope", "photo"}
    assert recs["sketch"]["status"] == recs["photo"]["status"] == "finished"
    failed = recs["nope"]
    assert failed["status"] == "failed" and "target='nope' is not a domain" in failed["error"]
    assert "[promptdg] sweep of 3 runs: 2 finished, 1 failed" in err
    assert "promptdg: error: 1 of 3 runs failed:" in err and failed["run_dir"] in err
    assert "3 finished" not in out + err and "Traceback" not in err

    code, out, _, _ = run_cli("collect", str(out_root), tiny=False)
    assert code == 0 and "Failed runs: 1" in out and failed["run_dir"] in out


def test_rerun_of_a_sweep_skips_finished_runs_and_retries_the_rest(run_cli, monkeypatch):
    from promptdg_cli import runner

    real = runner.check_method

    def refuse_zeroshot_name(cfg, method_cls):  # a failure before the runner writes anything
        if cfg.method.variant == "[class]":  # method=zeroshot_name
            raise ConfigError("zeroshot_name refused by the test")
        return real(cfg, method_cls)

    monkeypatch.setattr(runner, "check_method", refuse_zeroshot_name)
    sweep = ("train", "-m", "method=zeroshot,zeroshot_name", "target=sketch,photo")
    code, out, err, out_root = run_cli(*sweep)
    assert code == 1 and "2 of 4 runs failed" in err
    names = {"[class]": "zeroshot_name", "a photo of a [class].": "zeroshot"}
    by_key = {(names[r["variant"]], r["run_dir"].rsplit("/", 1)[1].split("_")[1]): r for r in results(out_root)}
    for target in ("sketch", "photo"):
        rec = by_key[("zeroshot_name", target)]
        # the failed record: the error, and the hash of the run (its directory's name) so a rerun may use the folder
        assert rec["status"] == "failed" and rec["error"] == "ConfigError: zeroshot_name refused by the test"
        assert rec["run_dir"].endswith(rec["config_hash"]) and rec["target_domains"] == [target]
        assert by_key[("zeroshot", target)]["status"] == "finished"

    # zeroshot/photo was interrupted before it wrote its record: it did not finish
    photo = Path(by_key[("zeroshot", "photo")]["run_dir"]) / "results.json"
    photo.unlink()
    sketch = Path(by_key[("zeroshot", "sketch")]["run_dir"]) / "results.json"
    before = sketch.stat().st_mtime_ns

    monkeypatch.setattr(runner, "check_method", real)
    code, out, err, _ = run_cli(*sweep)
    assert code == 0, err
    assert sketch.stat().st_mtime_ns == before  # untouched
    assert f"[promptdg] skipped: {sketch.parent} already finished" in out
    assert "[promptdg] sweep of 4 runs: 3 finished, 1 skipped (finished earlier)" in out
    recs = results(out_root)
    assert len(recs) == 4 and all(r["status"] == "finished" for r in recs)

    code, out, err, _ = run_cli(*sweep)  # everything finished: all skipped, nothing rewritten
    assert code == 0 and "[promptdg] sweep of 4 runs: 0 finished, 4 skipped (finished earlier)" in out
    assert sketch.stat().st_mtime_ns == before


def test_a_job_that_stops_the_sweep_is_reported(run_cli, monkeypatch):
    """A job that leaves the process (a preemption's SystemExit) ends an in-process sweep: the
    summary names it by its record (preempted) and says that the sweep stopped early."""
    from promptdg_cli import runner

    real = runner.run

    def preempted_on_photo(cfg, run_dir, mode="train"):
        if cfg.target != "photo":
            return real(cfg, run_dir, mode)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps({"status": "preempted", "config_hash": config_hash(cfg)}))
        raise SystemExit(128 + 10)

    monkeypatch.setattr(runner, "run", preempted_on_photo)
    code, out, err, out_root = run_cli("train", "-m", "method=zeroshot", "target=sketch,photo,printed")
    assert code == 138
    assert ("[promptdg] sweep of 2 runs: 1 finished, 1 preempted (the sweep stopped early, exit code 138: "
            "runs that never started are not counted)") in err
    assert "promptdg: error: 1 of 2 runs failed or did not finish:" in err
    assert "seed1_photo_" in err and "preempted (a checkpoint is saved: rerun to resume)" in err
    assert [r["status"] for r in results(out_root)] == ["preempted", "finished"]  # printed never started
    assert os.environ.get("PROMPTDG_SWEEP_REPORT") is None and not (out_root / ".promptdg").exists()


def test_single_run_errors_are_unchanged(run_cli):
    """Outside a sweep: one clear line and exit 2, no summary, no record for a refused config."""
    code, out, err, out_root = run_cli("train", "method=zeroshot", "target=nope")
    assert code == 2 and "promptdg: error: target='nope' is not a domain" in err
    assert "sweep of" not in out + err and "Traceback" not in err


# --------------------------------------------------------------------- collect at scale
def gen_records():
    spec = importlib.util.spec_from_file_location("gen_records", REPO / "tools" / "gen_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_on_hundreds_of_records(tmp_path, capsys):
    gen = gen_records()
    root = tmp_path / "records"
    info = gen.generate(root)  # 3 methods x 11 datasets x 5 shots x 3 seeds + zero-shot rows
    assert info["records"] == info["grid"] - len(info["missing"]) >= 500
    t = time.perf_counter()
    code = cli_main(["collect", str(root)])
    elapsed = time.perf_counter() - t
    out, err = capsys.readouterr()
    assert code == 0, err
    with capsys.disabled():
        print(f"\n[collect at scale] {info['records']} records: {elapsed:.2f} s (tables, .md/.csv/.tex/.png)")
    assert elapsed < 20  # about 2 s on 2 busy CPU cores; generous for slow CI machines

    # failed runs: listed with their directories, never averaged
    assert sum(int(n) for n in re.findall(r"Failed runs: (\d+)", out)) == len(info["failed"])
    assert all(d in out for d in info["failed"])
    assert f"{info['records'] - len(info['failed'])} finished, {len(info['failed'])} not" in err

    # partial seed counts: a left-out or failed seed leaves 2 of 3 (or fewer) in its cell
    records, _ = collect.load_records(root)
    tables = {t.dataset: t for t in collect.collect_tables(records)}
    lost = {}
    for m, b, d, k, s in info["missing"]:
        lost[(m, b, d, k)] = lost.get((m, b, d, k), 0) + 1
    for run_dir in info["failed"]:
        rec = json.loads((Path(run_dir) / "results.json").read_text())
        key = (rec["method"], rec["backbone"], rec["dataset"], rec["shots"])
        lost[key] = lost.get(key, 0) + 1
    for (m, b, d, k), n in lost.items():
        label = collect.method_label({"method": m, "variant": gen.ZS_VARIANT if m == "zeroshot" else "", "shots": k})
        cell = tables[d].cell(label, b, d)
        assert cell.n == 3 - n
        assert f"| {label} ({3 - n}/3 seeds) | {b} |" in out
    full = tables["dtd"].cell("dapt (16-shot)", "vit_b16", "dtd")
    assert full.n == 3 or ("dapt", "vit_b16", "dtd", 16) in lost
    # rows: zero-shot first, shot counts in numeric order
    labels = [r.label for r in tables["dtd"].rows if r.backbone == "vit_b16"]
    assert labels[0].startswith("zeroshot") and labels.index("dapt (2-shot)") < labels.index("dapt (16-shot)")

    # filters on the command line
    code = cli_main(["collect", str(root), "method=dapt", "backbone=vit_b16", "-o", str(tmp_path / "dapt")])
    out, _ = capsys.readouterr()
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| Method")]
    assert code == 0 and rows and all(l.startswith("| dapt (") and "| vit_b16 |" in l for l in rows)
    assert len(rows) == 11 * 5
    code = cli_main(["collect", str(root), "backbone=rn50", "--columns", "dataset", "-o", str(tmp_path / "rn50")])
    out, _ = capsys.readouterr()
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| Method")]
    assert code == 0 and len(rows) == 1 and rows[0].startswith("| zeroshot (a photo of a [class].)")
    assert "| Method | Backbone | imagenet | caltech101 |" in out


# --------------------------------------------------------------------- scripts
def test_table_scripts_call_only_promptdg_and_the_sbatch_example_parses():
    for script in sorted((REPO / "scripts").glob("*_table*.sh")):
        for line in script.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "set ", "OUT=", "for ", "done")):
                continue
            assert re.match(r"promptdg (train -m|collect|eval) ", line), f"{script.name}: {line}"
    example = REPO / "scripts" / "sbatch_example.sh"
    assert subprocess.run(["bash", "-n", str(example)]).returncode == 0
    text = example.read_text()
    for flag in ("--gpus-per-node=1", "--signal=B:USR1@120", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {flag}" in text, flag
    assert "srun promptdg train" in text
