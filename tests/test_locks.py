"""The run lock on a shared file system: real processes that pretend to be on other hosts
(PROMPTDG_HOSTNAME) hold, refuse, take over and race for one lock file.

Lock files written by hand here follow the documented record (JSON: token, host, pid, pid_start,
started, heartbeat, job, restart); a stale one also gets an old modification time."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptdg_cli.config import ConfigError
from promptdg_cli.locks import FileLock, RunLocked, read_holder, run_lock, stale_s

from conftest import results

REPO = Path(__file__).resolve().parents[1]

# a process that tries the lock once (at a given time), says what happened, and holds it until told
WORKER = r"""
import json, sys, time
from pathlib import Path
from promptdg_cli.locks import FileLock
path, start, stop = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
lock = FileLock(path)
while time.time() < start:
    time.sleep(0.001)
holder = lock.try_acquire()
print(json.dumps({"acquired": holder is None, "holder_host": holder and holder.host,
                  "took_over": lock.took_over and lock.took_over[0].token}), flush=True)
if holder is None:
    while not stop.exists():
        time.sleep(0.02)
    lock.release()
"""


def start_worker(path: Path, host: str, stop: Path, at: float = 0.0, **env) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(REPO), "PROMPTDG_HOSTNAME": host, **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(at), str(stop)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def answer(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return json.loads(line)


def write_lock(path: Path, host: str, pid: int, age: float, token: str = "t" * 32, job=None, restart=0) -> None:
    """A lock record by hand, its heartbeat (and the file's modification time) ``age`` seconds old."""
    then = time.time() - age
    path.write_text(json.dumps({"token": token, "host": host, "pid": pid, "pid_start": None, "started": then - 60,
                                "heartbeat": then, "job": job, "restart": restart}))
    os.utime(path, (then, then))


def wait_for(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def stop(tmp_path):
    flag = tmp_path / "stop"
    yield flag
    flag.touch()  # any holder still running lets go


def test_a_fresh_foreign_lock_is_refused_and_names_its_holder(tmp_path, stop, monkeypatch):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    holder = start_worker(lock, "node-b", stop)
    assert answer(holder)["acquired"]
    other = start_worker(lock, "node-a", stop)
    got = answer(other)
    assert got == {"acquired": False, "holder_host": "node-b", "took_over": None}
    assert other.wait(timeout=30) == 0
    # the engine's message: the holder, its host, its heartbeat's age, and what to do
    monkeypatch.setenv("PROMPTDG_HOSTNAME", "node-a")
    with pytest.raises(RunLocked) as e:
        run_lock(lock.parent)
    msg = str(e.value)
    assert f"process {holder.pid} on node-b" in msg and "heartbeat " in msg and " s ago" in msg
    assert "Wait for it to finish or stop it" in msg and "PROMPTDG_LOCK_STALE_S" in msg
    stop.touch()
    assert holder.wait(timeout=30) == 0 and not lock.exists()


def test_a_foreign_lock_whose_heartbeat_stopped_is_taken_over_once_stale(tmp_path, stop):
    lock = tmp_path / ".lock"
    holder = start_worker(lock, "node-b", stop, PROMPTDG_LOCK_HEARTBEAT_S=0.2)
    assert answer(holder)["acquired"]
    token = read_holder(lock).token
    holder.send_signal(signal.SIGKILL)  # a node lost: the lock stays, its heartbeat stops
    holder.wait(timeout=30)
    killed_at = time.time()
    early = start_worker(lock, "node-a", stop, PROMPTDG_LOCK_STALE_S=3)
    assert answer(early)["acquired"] is False  # less than 3 s since the last heartbeat: still live
    wait_for(lambda: time.time() - killed_at > 3.5)
    late = start_worker(lock, "node-a", stop, PROMPTDG_LOCK_STALE_S=3)
    assert answer(late) == {"acquired": True, "holder_host": None, "took_over": token}
    assert read_holder(lock).host == "node-a" and read_holder(lock).pid == late.pid


def test_a_dead_pid_on_the_same_host_is_taken_over_at_once_a_live_one_never(tmp_path, stop):
    lock = tmp_path / ".lock"
    holder = start_worker(lock, "node-c", stop)
    assert answer(holder)["acquired"]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert read_holder(lock).age() < 5  # its heartbeat is fresh: only the pid tells it is dead
    taker = start_worker(lock, "node-c", stop)  # the default stale age (300 s) does not matter here
    assert answer(taker)["acquired"]
    stop.touch()
    assert taker.wait(timeout=30) == 0
    # a live pid on this host keeps its lock, however old its heartbeat (a hung process is not dead)
    stop.unlink()
    write_lock(lock, "node-c", os.getpid(), age=10_000)
    refused = start_worker(lock, "node-c", stop)
    assert answer(refused) == {"acquired": False, "holder_host": "node-c", "took_over": None}
    # the same record from another host is stale there
    other = start_worker(lock, "node-d", stop)
    assert answer(other) == {"acquired": True, "holder_host": None, "took_over": "t" * 32}


@pytest.mark.parametrize("round_", range(3))
def test_processes_racing_for_one_stale_lock_exactly_one_wins(tmp_path, stop, round_):
    lock = tmp_path / ".lock"
    write_lock(lock, "node-gone", 4242, age=3600)
    go = time.time() + 4  # every process is started and waiting by then
    procs = [start_worker(lock, f"node-{i}", stop, at=go) for i in range(6)]
    answers = [answer(p) for p in procs]
    winners = [a for a in answers if a["acquired"]]
    assert len(winners) == 1, answers
    # one process removed the dead lock (not always the one that got the new lock: after the removal
    # every process competes as a plain creator)
    assert [a["took_over"] for a in answers].count("t" * 32) == 1, answers
    losers = {a["holder_host"] for a in answers if not a["acquired"]}
    (winner,) = [p for p, a in zip(procs, answers) if a["acquired"]]
    assert losers == {read_holder(lock).host} and read_holder(lock).pid == winner.pid
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # no break or temporary file left
    stop.touch()
    assert all(p.wait(timeout=30) == 0 for p in procs)


def test_the_heartbeat_advances_while_held_and_the_lock_goes_with_the_holder(tmp_path, stop):
    lock = tmp_path / ".lock"
    holder = start_worker(lock, "node-b", stop, PROMPTDG_LOCK_HEARTBEAT_S=0.2)
    assert answer(holder)["acquired"]
    first = read_holder(lock)
    time.sleep(1.0)
    second = read_holder(lock)
    assert second.token == first.token and second.started == first.started
    assert second.heartbeat - first.heartbeat >= 0.5  # 5 beats were due; at least some of them came
    stop.touch()
    assert holder.wait(timeout=30) == 0 and not lock.exists()


def test_a_late_taker_never_removes_the_lock_that_replaced_the_dead_one(tmp_path, monkeypatch):
    """Two takers read the same dead lock; one takes it over; the other, acting on what it read,
    must back off instead of removing the new lock."""
    monkeypatch.setenv("PROMPTDG_HOSTNAME", "node-a")
    path = tmp_path / ".lock"
    write_lock(path, "node-gone", 4242, age=3600)
    seen_by_late = read_holder(path)
    first, late = FileLock(path), FileLock(path)
    assert first.try_acquire() is None and first.took_over[0].token == "t" * 32
    assert late.take_over(seen_by_late) is False
    assert read_holder(path).token == first.token
    first.release()

    # a taker that died while taking over leaves its break file: a fresh one blocks the takeover
    # (another process is at it), one older than the stale age is skipped for the next number
    write_lock(path, "node-gone", 4242, age=3600)
    dead = read_holder(path)
    brk = tmp_path / f"..lock.{dead.token}.break1"
    brk.write_text("node-x 1\n")
    assert FileLock(path).take_over(dead) is False and path.exists()
    os.utime(brk, (time.time() - 3600,) * 2)
    assert FileLock(path).take_over(dead) is True and not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_requeued_slurm_job_waits_for_its_earlier_attempt_and_others_are_refused(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_lock(run_dir / ".lock", "node-b", 4242, age=0, job="777", restart=0)  # hard-killed: fresh, no heartbeat
    monkeypatch.setenv("PROMPTDG_HOSTNAME", "node-a")
    monkeypatch.setenv("PROMPTDG_LOCK_STALE_S", "5")
    monkeypatch.setenv("PROMPTDG_LOCK_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    t = time.time()
    with pytest.raises(RunLocked, match="Slurm job 777"):
        run_lock(run_dir)  # another job: refused at once
    assert time.time() - t < 4  # (long before the 5 s a wait would take)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = run_lock(run_dir)  # the same job, requeued: waits until the old heartbeat is 5 s old
    assert time.time() - t >= 4.9 and read_holder(run_dir / ".lock").token == lock.token
    lock.release()


def test_bad_lock_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("PROMPTDG_LOCK_STALE_S", "five minutes")
    with pytest.raises(ConfigError, match="PROMPTDG_LOCK_STALE_S='five minutes'.*positive number"):
        stale_s()


def test_train_refuses_a_locked_run_directory_and_takes_over_a_stale_lock(run_cli, monkeypatch):
    args = ("train", "method=zeroshot", "target=sketch", "force=true")
    code, _, err, out_root = run_cli(*args)
    assert code == 0, err
    (rec,) = results(out_root)
    lock = Path(rec["run_dir"]) / ".lock"
    write_lock(lock, "node-b", 4242, age=20)
    t = time.time()
    code, out, err, _ = run_cli(*args)
    print(f"\n[fresh foreign lock] refused in {time.time() - t:.2f} s: {err.strip()}")
    assert code == 2 and "promptdg: error: " in err and "is in use by process 4242 on node-b" in err
    assert (
        re.search(r"heartbeat 2\d s ago", err)
        and json.loads((lock.parent / "results.json").read_text())["status"] == "finished"
    )
    write_lock(lock, "node-b", 4242, age=stale_s() + 60)
    t = time.time()
    code, out, err, _ = run_cli(*args)
    line = next(l for l in (out + err).splitlines() if "taking over" in l)
    print(f"[stale foreign lock] run finished in {time.time() - t:.2f} s: {line}")
    assert code == 0, err
    assert (
        "taking over the lock of process 4242 on node-b" in out + err
        and "no heartbeat for more than 300 s" in out + err
    )
    assert not lock.exists()
