"""The CLI end to end on the tiny demo world: every method, records, the table, skip and resume."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptdg_cli.methods import method_class
from promptdg_cli.record import RunRecord
from promptdg_cli.training import TrainContext

from conftest import builtin_method_names, results, trained_methods

REPO = Path(__file__).resolve().parents[1]
FIELDS = {
    "method", "dataset", "backbone", "pretrained", "protocol", "seed", "source_domains", "target_domains",
    "accuracy", "avg_accuracy", "timings", "peak_memory_mb", "version", "git_revision", "config_hash", "status",
}


def test_the_method_suites_are_parametrised_from_the_configs():
    """Every built-in method (conf/method) is in the preemption and torchrun suites, whether or not a
    scenario names it: a new method is covered by its configs alone."""
    from test_ddp import SCENARIOS as DDP
    from test_preempt import SCENARIOS as PREEMPT

    assert set(trained_methods()) <= set(PREEMPT) and set(trained_methods()) - {"promptstyler"} <= set(DDP)
    assert {"coop", "dapl", "dapt", "domainfusion", "erm", "linear_probe", "promptstyler", "zeroshot"} <= set(
        builtin_method_names()
    )


@pytest.mark.parametrize("method", builtin_method_names())
def test_each_method_end_to_end_writes_records(run_cli, method, request):
    """Every registered method, with its tiny settings from conf/debug/<method>.yaml (a new method is
    covered by adding its file there)."""
    # never the demo LDM
    ldm = [f"method.ldm={request.getfixturevalue('tiny_ldm_dir')}"] if method == "domainfusion" else []
    # (erm: its debug config selects DomainBed's ResNet-50, random, at 32 px)
    code, out, err, out_root = run_cli(
        "train", f"method={method}", f"+debug={method}", *ldm, "target=sketch", clip=method != "erm"
    )
    assert code == 0, err
    (rec,) = results(out_root)
    assert FIELDS <= set(rec)
    RunRecord.from_dict(rec)  # the engine's record matches the schema collect reads (RecordError otherwise)
    cls = method_class({"name": method})
    source_free, uda = cls.protocol == "source_free", cls.protocol == "uda"
    key = "printed→sketch" if uda else "sketch"  # a UDA record is keyed by its source→target pair
    assert rec["status"] == "finished" and rec["method"] == method and rec["target_domains"] == [key]
    sources = [] if source_free else ["printed"] if uda else ["handwritten", "printed", "photo"]
    assert rec["source_domains"] == {key: sources}
    assert 0 <= rec["accuracy"][key] <= 100 and rec["avg_accuracy"] == rec["accuracy"][key]
    # a source-free model is trained once, for every domain; a UDA split is named after its pair
    split = "all" if source_free else "printed_to_sketch" if uda else "sketch"
    run_dir = Path(rec["run_dir"])
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert run_dir.name.startswith("seed1_sketch_") and run_dir.name.endswith(rec["config_hash"])
    if cls.trains:
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert lines and all(l["target"] == ("all" if source_free else key) for l in lines)
        assert (run_dir / "splits" / split / "model.safetensors").is_file()
        assert not (run_dir / "splits" / split / "checkpoint.pt").exists()  # replaced by the final model


def test_sweep_then_collect_prints_the_table(run_cli):
    code, _, err, out_root = run_cli("train", "-m", "method=zeroshot,linear_probe,coop", "method.epochs=1", "seed=1,2")
    assert code == 0, err
    recs = results(out_root)
    assert len(recs) == 6 and {r["method"] for r in recs} == {"zeroshot", "linear_probe", "coop"}
    assert all(set(r["accuracy"]) == {"handwritten", "printed", "sketch", "photo"} for r in recs)
    code, out, err, _ = run_cli("collect", str(out_root), tiny=False)
    assert code == 0, err
    header = next(l for l in out.splitlines() if l.startswith("| Method"))
    assert header.split("|")[3:8] == [" handwritten ", " printed ", " sketch ", " photo ", " Avg "]
    rows = [
        l
        for l in out.splitlines()
        if l.startswith("| zeroshot") or l.startswith("| coop") or l.startswith("| linear_probe")
    ]
    assert len(rows) == 3 and rows[0].startswith("| zeroshot")
    for f in ("results.md", "results.csv", "results.tex", "results.png"):
        assert (out_root / f).is_file()


def test_rerun_of_a_finished_config_is_skipped(run_cli):
    args = ("train", "method=coop", "method.epochs=1", "target=photo")
    code, _, _, out_root = run_cli(*args)
    assert code == 0
    (path,) = list(out_root.rglob("results.json"))
    before = path.stat().st_mtime_ns
    code, out, _, _ = run_cli(*args)
    assert code == 0 and "skipped" in out
    assert path.stat().st_mtime_ns == before
    # another seed is another run directory, never the same one
    code, _, _, _ = run_cli("train", "method=coop", "method.epochs=1", "target=photo", "seed=2")
    assert len(list(out_root.rglob("results.json"))) == 2


def test_interrupted_run_resumes_from_its_checkpoint_with_identical_results(run_cli, monkeypatch, tmp_path):
    args = ("train", "method=coop", "method.epochs=3", "target=printed")
    code, _, _, out_root = run_cli(*args)
    assert code == 0
    (reference,) = results(out_root)

    # a second output root: the same run, killed after its second epoch checkpoint
    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "interrupted"))
    saved = TrainContext._save
    calls = []

    def dying_save(self, section, state):
        saved(self, section, state)
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated preemption")

    monkeypatch.setattr(TrainContext, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*args)
    (failed,) = results(tmp_path / "interrupted")
    assert failed["status"] == "failed" and "simulated preemption" in failed["error"]
    ckpt = next((tmp_path / "interrupted").rglob("checkpoint.pt"))
    assert ckpt.is_file()

    monkeypatch.setattr(TrainContext, "_save", saved)
    resumed_epochs = []
    load = TrainContext.checkpoint
    monkeypatch.setattr(
        TrainContext, "checkpoint", lambda self, section: resumed_epochs.append(1) or load(self, section)
    )
    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "interrupted"))
    code, out, err, _ = run_cli(*args)
    assert code == 0, err
    (resumed,) = results(tmp_path / "interrupted")
    assert resumed["status"] == "finished"
    assert resumed["accuracy"] == reference["accuracy"]
    assert resumed["val_accuracy"] == reference["val_accuracy"]
    metrics = [json.loads(l) for l in (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    epochs = [m["epoch"] for m in metrics if "epoch" in m]
    assert epochs == [0, 1, 2]  # epochs 0 and 1 before the interruption, only epoch 2 after it


def test_finished_splits_are_not_recomputed(run_cli, monkeypatch):
    """A run over all targets interrupted after two targets recomputes only the remaining two."""
    from promptdg_cli import runner

    real = runner._run_split
    done = []

    def counting(cfg, method_cls, backbone, protocol, names, split, *a):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(split.target)
        return real(cfg, method_cls, backbone, protocol, names, split, *a)

    monkeypatch.setattr(runner, "_run_split", counting)
    with pytest.raises(KeyboardInterrupt):
        run_cli("train", "method=linear_probe")
    done.clear()
    monkeypatch.setattr(runner, "_run_split", lambda *a: done.append(a[5].target) or real(*a))
    code, out, _, out_root = run_cli("train", "method=linear_probe")
    assert code == 0 and done == ["sketch", "photo"]
    assert "handwritten: finished earlier" in out
    (rec,) = results(out_root)
    assert len(rec["accuracy"]) == 4


def test_eval_reevaluates_a_finished_run(run_cli):
    code, _, _, out_root = run_cli("train", "method=linear_probe", "target=sketch")
    (rec,) = results(out_root)
    code, out, err, _ = run_cli("eval", f"run_dir={rec['run_dir']}")
    assert code == 0, err
    evals = [r for r in results(out_root) if r.get("evaluated_run")]
    assert len(evals) == 1 and evals[0]["accuracy"]["sketch"] == pytest.approx(rec["accuracy"]["sketch"])


def test_bad_input_gets_one_clear_line(run_cli, tmp_path):
    code, _, err, _ = run_cli("train", "dataset=pacs", f"data_root={tmp_path}/nodata", tiny=False)
    assert code == 2 and "promptdg: error: dataset=pacs" in err and "Expected layout" in err
    assert "Traceback" not in err
    code, _, err, _ = run_cli("train", "target=cartoon")
    assert code == 2 and "target='cartoon' is not a domain" in err


def _cli(*args, cwd, env=None, timeout=120):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "promptdg_cli", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


def test_installed_cli_works_from_any_directory(tmp_path):
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "eval", "generate", "collect"))
    r = _cli("train", "--help", cwd=tmp_path)
    assert r.returncode == 0
    method_line = next(l for l in r.stdout.splitlines() if l.startswith("method:"))
    assert (
        all(name in method_line for name in builtin_method_names())
        and "backbone: demo_clip, resnet50_imagenet, rn101, rn50" in r.stdout
    )
    assert "experiment" in r.stdout and "promptstyler_main" in r.stdout
    r = _cli("train", "method=coop", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0 and "n_ctx: 16" in r.stdout


def test_unknown_method_and_dataset_list_choices(tmp_path):
    r = _cli("train", "method=nope", cwd=tmp_path)
    assert r.returncode != 0 and "Could not find 'method/nope'" in r.stderr and "linear_probe" in r.stderr
    r = _cli("train", "dataset=nope", cwd=tmp_path)
    assert r.returncode != 0 and "officehome" in r.stderr
    r = _cli("trian", cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean 'train'" in r.stderr


def test_backbone_without_weights_fails_in_seconds(tmp_path):
    t = time.time()
    r = _cli("eval", "backbone=vit_b16", f"cache_root={tmp_path}", "dataset.generator_args.per_class=2", cwd=tmp_path,
             env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2, r.stderr
    assert time.time() - t < 30
    assert "ViT-B-16-quickgelu / 'openai' are not on this machine" in r.stderr and "backbone.pretrained=" in r.stderr


def test_fewshot_dataset_refuses_domain_methods_and_names_missing_data(run_cli, tmp_path):
    code, _, err, _ = run_cli("train", "method=dapl", "dataset=caltech101", tiny=False)
    assert code == 2 and "dataset=caltech101" in err and "few-shot protocol" in err and "Traceback" not in err
    code, _, err, _ = run_cli("train", "method=coop", "dataset=caltech101", f"data_root={tmp_path}", tiny=False)
    assert code == 2 and "split_zhou_Caltech101.json" in err and "Traceback" not in err


def test_the_record_says_what_data_was_used(run_cli, tmp_path, monkeypatch):
    """Unreadable images, empty class folders and the shots drawn per class are in results.json."""
    from promptdg_cli.demo.world import generate_dataset

    monkeypatch.setenv("PROMPTDG_CACHE", str(tmp_path / "cache"))  # a world of this test's own
    root = generate_dataset(tmp_path / "cache" / "data" / "demo_digits", per_class=8)
    for p in (Path(root) / "photo" / "seven").iterdir():
        p.unlink()
    broken = sorted((Path(root) / "sketch" / "one").iterdir())[0]
    broken.write_bytes(b"not a png")
    code, _, err, out_root = run_cli("train", "method=coop", "method.epochs=1", "shots=1000", "target=handwritten")
    assert code == 0, err
    (rec,) = results(out_root)
    used = rec["data_used"]
    assert used["empty_class_folders"] == {"demo_digits/photo": ["seven"]}
    assert used["unreadable_images"] == {"demo_digits/sketch": 1}
    drawn = used["shots_per_class"]["handwritten"]
    assert set(drawn) == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    # 1000 asked, every training image of a class used: 3 source domains x 8, 20 % held out
    assert all(0 < n < 1000 for n in drawn.values()) and drawn["seven"] < drawn["two"]  # (photo has no seven)
