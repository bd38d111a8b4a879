"""`make demo`'s plan (read with `make -n`, nothing runs) and its lane helper, tools/demo_lane.sh."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from promptdg_cli.methods import method_class

from conftest import builtin_method_names

REPO = Path(__file__).resolve().parents[1]
LANE = REPO / "tools" / "demo_lane.sh"


def _demo_plan(out: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "--no-print-directory", "demo", f"DEMO_OUT={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if " train " in line]


def test_make_demo_trains_every_registered_method_once():
    runs = {}
    for line in _demo_plan("demo-out-x"):
        methods = re.search(r"\bmethod=([\w,]+)", line).group(1).split(",")
        protocol = "uda" if "dataset.protocol=uda" in line else "dg"
        for m in methods:
            runs.setdefault((m, protocol), []).append(line)
            assert "out_root=demo-out-x" in line
    names = {m for m, _ in runs}
    # every method that runs on the demo CLIP has a row (erm trains an ImageNet classifier: none in the demo world)
    methods = builtin_method_names()
    assert {n for n in names if n in methods} == {
        m for m in methods if "clip" in method_class({"name": m}).backbone_kinds
    }
    assert all(len(v) == 1 for v in runs.values()), runs  # and is trained once per protocol
    assert ("dapl", "uda") in runs and ("zeroshot", "uda") in runs  # DAPL next to its UDA baseline


def test_make_demo_lane_commands_run_through_the_one_thread_helper():
    plan = _demo_plan("demo-out-y")
    laned = [line for line in plan if "demo_lane.sh" in line]
    logs = {re.search(r"demo_lane\.sh (\S+)", line).group(1) for line in laned}
    assert logs == {"demo-out-y/logs/demo-lane-a.log", "demo-out-y/logs/demo-lane-b.log"}
    # the methods that keep two threads busy (the world and CLIP build, the LDM) run outside the lanes
    first, last = plan[0], plan[-1]
    assert "zeroshot" in first and "demo_lane.sh" not in first
    assert "method=domainfusion" in last and "demo_lane.sh" not in last


def test_demo_lane_logs_everything_shows_result_lines_and_keeps_the_status(tmp_path):
    log = tmp_path / "logs" / "lane.log"
    cmd = ['echo "[promptdg] coop target=sketch: top-1 55.3%"; printf "epochs 50%%|#####\\r" >&2; '
           'echo "threads=$OMP_NUM_THREADS/$MKL_NUM_THREADS"; printf "epochs 100%%|##########\\r" >&2; '
           'echo "[promptdg] done"; echo "[2026-11-30 11:13:03][promptdg][INFO] - a log line"; exit 3']
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", str(LANE), str(log), "bash", "-c", *cmd], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 3
    # the second result line shares its line with a progress bar (which ends in "\r"); log lines stay out
    assert done.stdout.splitlines() == ["[promptdg] coop target=sketch: top-1 55.3%", "[promptdg] done"]
    assert "failed (exit 3)" in done.stderr and "epochs 50%|#####" in done.stderr  # the log's end, on an error
    text = log.read_text()
    assert "epochs 50%|#####" in text and "threads=1/1" in text  # stderr kept; one thread
    assert text.splitlines()[0].startswith("$ bash -c")
    again = subprocess.run(["bash", str(LANE), str(log), "true"], capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""  # no result line is no error
    assert log.read_text().startswith(text)  # appended, never overwritten
