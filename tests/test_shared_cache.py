"""Many jobs filling one feature cache: one process encodes a domain, the others wait for its file.

Real processes share a cache root; the encode function is wrapped to append a line to a counter
file, so the number of encodings is counted across processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import dataset_cfg

from promptdg_cli.compute_once import CacheWaitTimeout, claim_path, compute_once
from promptdg_cli.data import dataset_dir, list_domain
from promptdg_cli.locks import FileLock

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, logging, os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
from promptdg_cli.backbone import ClipBackbone
from promptdg_cli.data import FeatureCache

logging.basicConfig(level=logging.INFO)
a = json.loads(sys.argv[1])
backbone = ClipBackbone.from_config(
    SimpleNamespace(model="demo-clip-vit", pretrained=a["clip"], builder=None, cache_dir=None, arch="vit")
)
cache = FeatureCache(a["cache"], num_workers=0)
real = FeatureCache._encode

def counted(self, *args, **kw):
    with open(a["counter"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # the claim is held a while: every other process finds it
    return real(self, *args, **kw)

FeatureCache._encode = counted
Path(a["ready"]).touch()
while not os.path.exists(a["go"]):
    time.sleep(0.005)
f = cache.list_features(backbone, "demo_digits", "sketch", [Path(p) for p in a["paths"]], a["labels"])
torch.save({"x": f.x, "paths": f.paths, "misses": cache.misses, "hits": cache.hits}, a["out"])
"""


@pytest.fixture
def world(tmp_path):
    cfg = dataset_cfg(tmp_path / "data")
    dataset_dir(cfg)
    cfg.generator = None
    return cfg


def test_processes_asking_at_once_encode_a_domain_once_and_get_the_same_features(world, random_clip, tmp_path):
    paths, labels = list_domain(world, "sketch")
    n = 3  # (each process imports torch and open_clip: seconds apiece on 2 cores)
    procs = []
    for i in range(n):
        args = {"clip": str(random_clip), "cache": str(tmp_path / "cache"), "counter": str(tmp_path / "encoded"),
                "ready": str(tmp_path / f"ready{i}"), "go": str(tmp_path / "go"), "out": str(tmp_path / f"out{i}.pt"),
                "paths": [str(p) for p in paths], "labels": labels}
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()  # all of them ask for the features now
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert len((tmp_path / "encoded").read_text().splitlines()) == 1  # one encoding in all
    outs = [torch.load(tmp_path / f"out{i}.pt", weights_only=True) for i in range(n)]
    assert sorted(o["misses"] for o in outs) == [0] * (n - 1) + [1]
    assert all(torch.equal(o["x"], outs[0]["x"]) and o["paths"] == outs[0]["paths"] for o in outs)
    assert outs[0]["x"].shape == (len(paths), 128) and outs[0]["paths"] == [str(p) for p in paths]
    per_process = [
        [l for l in log.splitlines() if "waiting for the features of demo_digits/sketch" in l] for log in logs
    ]
    assert all(len(w) <= 1 for w in per_process)  # logged once, however long the wait
    waiting = [l for w in per_process for l in w]
    assert waiting and all("being computed by process" in l for l in waiting)  # (a late one may find the file)
    print(f"\n[shared feature cache] {n} processes, one encoding; a waiting one logged: {waiting[0]}")
    files = sorted(p.name for p in (tmp_path / "cache" / "features" / "demo_digits").iterdir())
    assert len(files) == 1 and files[0].startswith("sketch-") and files[0].endswith(".safetensors")  # no claim left


def test_a_waiting_job_gives_up_naming_the_file_and_who_computes_it(tmp_path, monkeypatch):
    file = tmp_path / "f.bin"
    holder = FileLock(claim_path(file))  # a live claim (this process, another thread's view)
    assert holder.try_acquire() is None
    monkeypatch.setenv("PROMPTDG_CACHE_WAIT_S", "1")
    t = time.time()
    with pytest.raises(CacheWaitTimeout) as e:
        compute_once(file, lambda: b"x", lambda v, p: p.write_bytes(v), lambda p: p.read_bytes(), "a test file")
    assert time.time() - t >= 1  # (and then gave up: no computation, no file)
    assert not file.exists()
    msg = str(e.value)
    assert f"gave up waiting for a test file ({file}) after 1 s (PROMPTDG_CACHE_WAIT_S)" in msg
    assert f"process {os.getpid()} on " in msg and "stop it" in msg
    holder.release()
    # the claim gone, the next caller computes it; a later one reads it
    assert compute_once(file, lambda: b"x", lambda v, p: p.write_bytes(v), lambda p: p.read_bytes(), "a test file") == (
        b"x",
        True,
    )
    assert compute_once(file, lambda: b"y", lambda v, p: p.write_bytes(v), lambda p: p.read_bytes(), "a test file") == (
        b"x",
        False,
    )


def test_a_claim_left_by_a_dead_process_is_taken_over(tmp_path):
    file = tmp_path / "f.bin"
    dead = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    pid = int(dead.communicate()[0])
    now = time.time()
    claim_path(file).write_text(
        json.dumps(
            {
                "token": "d" * 32,
                "host": FileLock(file).host,
                "pid": pid,
                "pid_start": None,
                "started": now,
                "heartbeat": now,
                "job": None,
                "restart": 0,
            }
        )
    )
    value, computed = compute_once(
        file, lambda: b"z", lambda v, p: p.write_bytes(v), lambda p: p.read_bytes(), "a test file"
    )
    assert (value, computed) == (b"z", True) and file.read_bytes() == b"z" and not claim_path(file).exists()


def test_a_failed_computation_releases_the_claim(tmp_path):
    file = tmp_path / "f.bin"

    def boom():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        compute_once(file, boom, lambda v, p: p.write_bytes(v), lambda p: p.read_bytes(), "a test file")
    assert not claim_path(file).exists() and not file.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- build_once (the demo CLIP and LDM)
BUILDER = r"""
import json, logging, sys, time
from pathlib import Path
from promptdg_cli.compute_once import build_once
logging.basicConfig(level=logging.INFO, format="%(message)s")
a = json.loads(sys.argv[1])
folder, go = Path(a["folder"]), Path(a["go"])
Path(a["ready"]).touch()
while not go.exists():
    time.sleep(0.01)

def build():  # like the demo LDM: a folder, finished when its marker is there
    with open(a["counter"], "a") as f:
        f.write("built\n")
    time.sleep(1.0)
    tmp = folder.with_name(folder.name + ".tmp" + a["ready"][-1])
    tmp.mkdir(parents=True)
    (tmp / "marker").write_text("done")
    tmp.rename(folder)

print("BUILT" if build_once(folder, (folder / "marker").is_file, build, "a test folder") else "FOUND")
"""


def test_processes_needing_a_missing_build_at_once_build_it_once(tmp_path):
    n = 3
    args = [
        {
            "folder": str(tmp_path / "cache" / "model"),
            "go": str(tmp_path / "go"),
            "ready": str(tmp_path / f"ready{i}"),
            "counter": str(tmp_path / "built"),
        }
        for i in range(n)
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, json.dumps(a)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for a in args]
    deadline = time.time() + 120
    while not all(Path(a["ready"]).exists() for a in args):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        time.sleep(0.02)
    (tmp_path / "go").touch()
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert (tmp_path / "built").read_text() == "built\n"  # one build in all
    assert sorted(log.splitlines()[-1] for log in logs) == ["BUILT", "FOUND", "FOUND"]
    assert sum("waiting for a test folder" in log for log in logs) >= 1  # (a late one may find it done)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]  # no claim left behind
