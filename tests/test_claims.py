"""scripts/claims.py: the aggregation and the verdict on hand-made records, and one end-to-end run of
the script on the tiny world (random-weight demo CLIP, PromptStyler's claim, two seeds)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("claims", REPO / "scripts" / "claims.py")
claims = importlib.util.module_from_spec(_spec)
sys.modules["claims"] = claims  # (its dataclasses look their module up there)
_spec.loader.exec_module(claims)


def rec(seed, acc, status="finished", mtime=0.0):
    return {"status": status, "seed": seed, "avg_accuracy": acc, "_mtime": mtime}


# --------------------------------------------------------------------- aggregation
def test_mean_and_sample_std():
    mean, std = claims.mean_std([40.0, 42.0, 47.0])
    assert mean == pytest.approx(43.0)
    # deviations -3, -1, 4: (9 + 1 + 16) / (3 - 1) = 13
    assert std == pytest.approx(math.sqrt(13.0))
    assert claims.mean_std([41.5]) == (41.5, None)  # one value: no std
    assert claims.mean_std([]) == (None, None)


def test_seed_values_keep_finished_requested_seeds_and_the_newest_record():
    records = [
        rec(1, 50.0, mtime=10.0),
        rec(1, 30.0, mtime=5.0),  # older record of seed 1: passed over
        rec(2, 44.0, status="failed"),  # a failed run has no value
        rec(3, 47.0),
        rec(4, 99.0),  # a seed not asked for
        rec(2, 45.0, mtime=20.0),
        rec(2, 46.0, mtime=1.0),  # older: passed over
    ]
    values, passed_over = claims.seed_values(records, [1, 2, 3])
    assert values == {1: 50.0, 2: 45.0, 3: 47.0}
    assert passed_over == 2
    values, _ = claims.seed_values([rec(2, 45.0, status="failed")], [1, 2])
    assert values == {}


def test_paired_wins_and_verdict():
    method = {1: 50.0, 2: 45.0, 3: 47.0}
    # a seed-free (zero-shot) baseline: one value, 46, for every seed -> 50 > 46, 45 < 46, 47 > 46
    assert claims.paired_wins(method, {1: 46.0}, [1, 2, 3], base_seed_free=True) == (2, 3)
    assert claims.verdict(2, 3, 3) == "not reproduced (2/3)"
    # paired by seed: 50 > 49, 45 > 44, 47 > 46
    assert claims.paired_wins(method, {1: 49.0, 2: 44.0, 3: 46.0}, [1, 2, 3], base_seed_free=False) == (3, 3)
    assert claims.verdict(3, 3, 3) == "reproduced (3/3)"
    # a tie is not a win
    assert claims.paired_wins(method, {1: 50.0, 2: 44.0, 3: 46.0}, [1, 2, 3], base_seed_free=False) == (2, 3)
    # a seed without a baseline run: incomplete, whatever the other seeds say
    assert claims.paired_wins(method, {1: 49.0, 3: 46.0}, [1, 2, 3], base_seed_free=False) == (2, 2)
    assert claims.verdict(2, 2, 3) == "incomplete (2 of 3 seeds)"


def test_compare_row_numbers():
    row = claims.Row("dapl", "text", "paper", "dapl_U0", "dapl")
    out = claims.compare(row, {"dapl_U0": {1: 40.0, 2: 42.0}, "dapl": {1: 41.0, 2: 41.0}}, [1, 2])
    assert out["baseline_mean"] == pytest.approx(41.0) and out["method_mean"] == pytest.approx(41.0)
    assert out["baseline_std"] == pytest.approx(math.sqrt(2.0))  # (1 + 1) / 1
    assert out["method_std"] == 0.0
    assert (out["wins"], out["paired_seeds"], out["reproduced"]) == (1, 2, False)
    assert out["verdict"] == "not reproduced (1/2)"


def test_every_row_names_known_arms_and_the_options_are_checked():
    for row in claims.ROWS:
        assert row.baseline in claims.ARMS and row.method in claims.ARMS and row.baseline != row.method
    assert claims.parse_seeds("1,2,3") == [1, 2, 3]
    with pytest.raises(SystemExit, match="--seeds='1,x'"):
        claims.parse_seeds("1,x")
    with pytest.raises(SystemExit, match="'copo' is not a claim. Valid: coop, promptstyler, dapl, dapt, domainfusion"):
        claims.parse_only("coop,copo")
    assert claims.parse_only("dapt,coop") == ["coop", "dapt"]


# --------------------------------------------------------------------- the script's flow, runs faked
def finished_record(run_dir: Path, method: str, seed: int, avg: float) -> dict:
    """A finished results.json that passes RunRecord's checks (one target domain, its accuracy = avg)."""
    return {"status": "finished", "method": method, "variant": "", "dataset": "demo_digits", "backbone": "demo_clip",
            "model": "demo-clip-vit", "pretrained": "x", "protocol": "dg", "seed": seed, "domains": ["sketch"],
            "config_hash": f"{method}{seed}", "run_dir": str(run_dir), "target_domains": ["sketch"],
            "source_domains": {"sketch": []}, "accuracy": {"sketch": avg}, "avg_accuracy": avg,
            "timings": {"total_s": 1.0}, "peak_memory_mb": {"cpu": None}}


def fake_promptdg(accuracies, codes, calls):
    """Stands in for `promptdg train -m ...`: writes a record per seed with the arm's accuracy, or
    none (a failed sweep), and returns the arm's exit code."""
    def run(args):
        calls.append(args)
        opts = dict(a.split("=", 1) for a in args if "=" in a)
        out_root = Path(opts["out_root"])
        for seed in map(int, opts["seed"].split(",")):
            acc = accuracies[out_root.name].get(seed)
            if acc is not None:
                run_dir = out_root / f"seed{seed}"
                run_dir.mkdir(parents=True)
                (run_dir / "results.json").write_text(json.dumps(finished_record(run_dir, opts["method"], seed, acc)))
        return codes.get(out_root.name, 0)
    return run


def test_main_flow_with_faked_runs(tmp_path, monkeypatch, capsys):
    calls = []
    accuracies = {"zeroshot_uda": {1: 40.0}, "dapl": {1: 41.0, 2: 42.0, 3: 39.0}, "dapl_U0": {1: 40.0, 3: 38.0}}
    monkeypatch.setattr(claims, "promptdg", fake_promptdg(accuracies, {"dapl_U0": 1}, calls))
    out = tmp_path / "claims"
    assert claims.main(["--only", "dapl", "--out", str(out)]) == 1  # dapl_U0's sweep failed at seed 2
    # one sweep per arm; the zero-shot arm at the first seed only
    assert [(c[2], c[3]) for c in calls] == [("method=zeroshot", "seed=1"), ("method=dapl", "seed=1,2,3"),
                                             ("method=dapl", "seed=1,2,3")]
    assert "dataset.protocol=uda" in calls[0] and "method.U=0" in calls[2]
    saved = json.loads((out / "claims.json").read_text())
    zs, u0 = saved["rows"]
    # 41 > 40, 42 > 40, 39 < 40; mean 40.667, std sqrt((0.111 + 1.778 + 2.778) / 2) = sqrt(7/3)
    assert (zs["wins"], zs["verdict"]) == (2, "not reproduced (2/3)")
    assert zs["method_mean"] == pytest.approx(122.0 / 3) and zs["method_std"] == pytest.approx(math.sqrt(7.0 / 3.0))
    assert zs["baseline_mean"] == 40.0 and zs["baseline_std"] is None
    assert (u0["paired_seeds"], u0["verdict"]) == (2, "incomplete (2 of 3 seeds)")
    table = (out / "claims.md").read_text()
    assert "| 40.0 | DAPL | 40.7 ± 1.5 | not reproduced (2/3) |" in table
    assert "| 39.0 ± 1.4 (2/3 seeds) | DAPL | 40.7 ± 1.5 | incomplete (2 of 3 seeds) |" in table
    assert "the sweep of dapl_U0 exited with 1" in table


def test_main_stops_at_a_stopped_sweep(tmp_path, monkeypatch, capsys):
    """A sweep stopped by a signal (promptdg's preemption: exit 128 + 15) stops the script there."""
    calls = []
    accuracies = {"zeroshot": {}, "coop": {}}
    monkeypatch.setattr(claims, "promptdg", fake_promptdg(accuracies, {"zeroshot": 143}, calls))
    assert claims.main(["--only", "coop", "--out", str(tmp_path / "c")]) == 143
    assert len(calls) == 1 and "rerun the same command to resume" in capsys.readouterr().err


# --------------------------------------------------------------------- --jobs: arms as processes
FAKE_ARM = r"""
import json, os, sys, time
from pathlib import Path
opts = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
out_root = Path(opts["out_root"])
plan = json.loads(Path(os.environ["FAKE_PLAN"]).read_text())[out_root.name]
start = time.time()
time.sleep(plan["sleep"])
for seed in opts["seed"].split(","):
    record = plan["records"].get(seed)
    if record:
        run_dir = out_root / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({**record, "run_dir": str(run_dir)}))
span = [start, time.time(), os.environ.get("OMP_NUM_THREADS")]
(out_root.parent / f"{out_root.name}.span").write_text(json.dumps(span))
print("fake promptdg", *sys.argv[1:])
sys.exit(plan["code"])
"""


FAKE_PREPARE = r"""
import json, os, sys, time
from pathlib import Path
start = time.time()
time.sleep(0.5)
note = Path(os.environ["FAKE_PLAN"]).with_name("assets.json")
note.write_text(
    json.dumps({"span": [start, time.time()], "args": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS")})
)
sys.exit(int(os.environ.get("FAKE_PREPARE_CODE", "0")))
"""


def fake_arm_processes(tmp_path, monkeypatch, accuracies, codes, sleep):
    """ARM_COMMAND runs a script that stands in for `python -m promptdg_cli train -m ...` (as
    fake_promptdg, in its own process), and notes when it ran and with how many threads;
    PREPARE_COMMAND one that stands in for `python -m promptdg_cli.demo.assets` (tmp_path/assets.json)."""
    (tmp_path / "fake_prepare.py").write_text(FAKE_PREPARE)
    monkeypatch.setattr(claims, "PREPARE_COMMAND", [sys.executable, str(tmp_path / "fake_prepare.py")])
    plan = {key: {"sleep": sleep[key] if isinstance(sleep, dict) else sleep, "code": codes.get(key, 0),
                  "records": {str(s): finished_record(Path("x"), key, s, a) for s, a in acc.items()}}
            for key, acc in accuracies.items()}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "fake_arm.py").write_text(FAKE_ARM)
    monkeypatch.setattr(claims, "ARM_COMMAND", [sys.executable, str(tmp_path / "fake_arm.py")])
    monkeypatch.setenv("FAKE_PLAN", str(tmp_path / "plan.json"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(claims.os, "cpu_count", lambda: 4)


def test_jobs_run_the_arms_side_by_side_longest_first(tmp_path, monkeypatch, capsys):
    accuracies = {"zeroshot_uda": {1: 40.0}, "dapl": {1: 41.0, 2: 42.0}, "dapl_U0": {1: 40.0, 2: 43.0}}
    fake_arm_processes(tmp_path, monkeypatch, accuracies, {}, sleep=1.0)
    out = tmp_path / "claims"
    out.mkdir()  # the last run's arm times: the two DAPL arms are the long ones
    (out / "claims.json").write_text(json.dumps({"arm_wall_s": {"zeroshot_uda": 1.0, "dapl": 300.0, "dapl_U0": 200.0}}))
    assert claims.main(["--only", "dapl", "--seeds", "1,2", "--out", str(out), "--jobs", "2"]) == 0
    span = {k: json.loads((out / f"{k}.span").read_text()) for k in accuracies}
    assert {s[2] for s in span.values()} == {"2"}  # 4 cores // 2 arms at a time
    assert span["dapl"][0] < span["dapl_U0"][1] and span["dapl_U0"][0] < span["dapl"][1]  # side by side
    assert span["zeroshot_uda"][0] >= min(span["dapl"][1], span["dapl_U0"][1])  # the third waits for a slot
    assert "fake promptdg train -m method=dapl seed=1,2" in (out / "dapl.log").read_text()
    zs, u0 = json.loads((out / "claims.json").read_text())["rows"]
    assert (zs["wins"], zs["verdict"]) == (2, "reproduced (2/2)")  # 41 > 40, 42 > 40
    assert (u0["wins"], u0["verdict"]) == (1, "not reproduced (1/2)")  # 41 > 40, 42 < 43
    assert "claims: dapl finished with exit code 0" in capsys.readouterr().out
    # the shared models were built first, alone, with the cores the process has (no arm's share)
    prepared = json.loads((tmp_path / "assets.json").read_text())
    assert prepared["span"][1] <= min(s[0] for s in span.values())
    assert prepared["omp"] is None and prepared["args"] == []  # no DomainFusion arm: no --ldm


def test_arm_order_without_a_last_run_starts_domainfusions_arms():
    keys = ["zeroshot", "coop", "dapl", "domainfusion_no_ldm", "domainfusion"]
    assert claims.arm_order(keys, Path("/nonexistent")) == [
        "domainfusion_no_ldm",
        "domainfusion",
        "zeroshot",
        "coop",
        "dapl",
    ]


def test_jobs_build_the_ldm_first_for_domainfusion_and_stop_if_that_fails(tmp_path, monkeypatch, capsys):
    accuracies = {"domainfusion": {1: 50.0}, "domainfusion_no_ldm": {1: 49.0}, "domainfusion_distill_only": {1: 48.0}}
    fake_arm_processes(tmp_path, monkeypatch, accuracies, {}, sleep=0.0)
    out = tmp_path / "c"
    args = ["--only", "domainfusion", "--seeds", "1", "--out", str(out), "--jobs", "2", "--extra", "device=cpu"]
    assert claims.main(args) == 0
    assert json.loads((tmp_path / "assets.json").read_text())["args"] == ["--ldm", "device=cpu"]
    (tmp_path / "assets.json").unlink()
    for arm in accuracies:
        (out / f"{arm}.span").unlink()
    monkeypatch.setenv("FAKE_PREPARE_CODE", "3")
    assert claims.main(args) == 3
    assert (tmp_path / "assets.json").is_file() and not list(out.glob("*.span"))  # no arm started
    assert "no arm was started" in capsys.readouterr().err


def test_jobs_start_no_arm_after_one_was_stopped(tmp_path, monkeypatch, capsys):
    """An arm stopped by a signal (exit 128 + 15): the running arm finishes, the queued one never starts."""
    accuracies = {"zeroshot_uda": {}, "dapl": {1: 41.0}, "dapl_U0": {1: 40.0}}
    fake_arm_processes(tmp_path, monkeypatch, accuracies, {"zeroshot_uda": 143},
                       sleep={"zeroshot_uda": 0.0, "dapl": 1.0, "dapl_U0": 0.0})
    out = tmp_path / "c"
    assert claims.main(["--only", "dapl", "--seeds", "1", "--out", str(out), "--jobs", "2"]) == 143
    assert (out / "dapl.span").is_file() and not (out / "dapl_U0.span").exists()
    assert "rerun the same command to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--jobs=0 must be at least 1"):
        claims.main(["--only", "dapl", "--out", str(out), "--jobs", "0"])


def test_jobs_interrupted_terminate_the_running_arms(tmp_path, monkeypatch):
    accuracies = {"zeroshot": {}, "coop": {1: 50.0}}
    fake_arm_processes(tmp_path, monkeypatch, accuracies, {}, sleep=60.0)
    started = []

    def interrupt(seconds):
        started.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(claims.time, "sleep", interrupt)
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        claims.main(["--only", "coop", "--seeds", "1", "--out", str(tmp_path / "c"), "--jobs", "2"])
    assert started and time.perf_counter() - t < 30  # both arms were stopped, not waited for (60 s each)
    assert not list((tmp_path / "c").glob("*.span"))  # neither reached its end


# --------------------------------------------------------------------- end to end
def test_claims_script_end_to_end_on_the_tiny_world(tmp_path, shared_cache, random_clip, monkeypatch, capsys):
    monkeypatch.setenv("PROMPTDG_CACHE", str(shared_cache))
    out = tmp_path / "claims"
    extra = [t for t in TINY if not t.startswith("dataset.")] + [f"backbone.pretrained={random_clip}"]
    code = claims.main(["--debug", "--seeds", "1,2", "--only", "promptstyler", "--out", str(out), "--extra", *extra])
    printed = capsys.readouterr().out
    assert code == 0

    # the records, read here without the script: PromptStyler at seeds 1 and 2, each zero-shot row once
    found = [json.loads(p.read_text()) for p in sorted(out.rglob("results.json"))]
    by_label = {}
    for r in found:
        assert r["status"] == "finished"
        by_label.setdefault(r["variant"] or r["method"], {})[r["seed"]] = r["avg_accuracy"]
    assert set(by_label) == {"[class]", "a photo of a [class].", "promptstyler"}
    assert set(by_label["promptstyler"]) == {1, 2} and set(by_label["[class]"]) == {1}
    styler = sorted(by_label["promptstyler"].values())
    styler_mean = (styler[0] + styler[1]) / 2
    styler_std = abs(styler[1] - styler[0]) / math.sqrt(2)  # sample std of two values

    table = (out / "claims.md").read_text()
    assert table in printed
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Claim")]
    assert len(rows) == 2
    for line, base in zip(rows, ("[class]", "a photo of a [class].")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "PromptStyler (ICCV 2023), Table 2"
        assert cells[2] == f'zero-shot "{base}"' and cells[4] == "PromptStyler"
        assert cells[3] == f"{by_label[base][1]:.1f}"
        assert cells[5] == f"{styler_mean:.1f} ± {styler_std:.1f}"
        wins = sum(v > by_label[base][1] for v in styler)
        assert cells[6] == f"{'reproduced' if wins == 2 else 'not reproduced'} ({wins}/2)"
    assert "Reproduced: the method's avg accuracy is strictly higher" in table and "Wall time:" in table

    saved = json.loads((out / "claims.json").read_text())
    assert [r["baseline_arm"] for r in saved["rows"]] == ["zeroshot_name", "zeroshot"]
    assert saved["rows"][0]["method_mean"] == pytest.approx(styler_mean)
    assert saved["rows"][0]["method_per_seed"] == {str(s): v for s, v in by_label["promptstyler"].items()}

    # a rerun reuses every finished run: no new record, the same table
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert (
        claims.main(["--debug", "--seeds", "1,2", "--only", "promptstyler", "--out", str(out), "--extra", *extra]) == 0
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == mtimes
    assert (out / "claims.md").read_text().split("Wall time")[0] == table.split("Wall time")[0]
