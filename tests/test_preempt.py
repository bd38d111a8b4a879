"""Preemption: a real SIGUSR1/SIGTERM stops every training method at a checkpoint (mid-epoch where
epochs are long), the run is recorded as ``preempted`` (resumable, not failed), and rerunning the
same command finishes with the results of an uninterrupted run of the same seed.

Tolerance: accuracies (per domain and validation) must be exactly equal; the saved model tensors
within 1e-6 (CPU float non-determinism between identical runs is ~1e-9; in practice they are equal).
"""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptdg_cli.methods import method_class
from promptdg_cli.training import TrainContext

from conftest import RESNET, TINY, results, tiny_args, trained_methods

# Scenarios chosen for an edge (a mid-epoch stop, a stop inside an augmentation round); a method without
# one is run from its configs (tiny_args). name -> (overrides, split folder, which preempt point (1-based)
# gets the signal, mid-epoch checkpoint?)
# preempt points: one after every optimisation step (coop, dapl, dapt) and one at every checkpoint
# (epoch end; linear probe: every C value; promptstyler: every style and classifier epoch)
# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

CASES = {
    # 192 source images, batch 32: 6 steps + 1 epoch checkpoint per epoch -> signal at epoch 1, step 2
    "coop": (["method=coop", "method.epochs=3", "method.n_ctx=4", "target=sketch"], "sketch", 9, True),
    # 17 C values (13 + 4 refined; strongly regularised ones only: quick fits): stop after the 5th fit
    "linear_probe": (
        ["method=linear_probe", "method.c_max=100", "method.refine_steps=4", "target=sketch"],
        "sketch",
        5,
        False,
    ),
    # 2 styles then 2 classifier epochs: stop after the second style
    "promptstyler": (
        ["method=promptstyler", "method.n_styles=2", "method.style_iters=3", "method.epochs=2"],
        "all",
        2,
        False,
    ),
    # UDA printed -> sketch: 64 source images, batch 16: 4 steps + 1 per epoch -> epoch 1, step 2
    "dapl": (
        [
            "method=dapl",
            "method.epochs=2",
            "method.n_ctx=2",
            "method.n_dom_ctx=2",
            "method.batch_size=16",
            "method.target_batch_size=16",
            "source=[printed]",
            "target=sketch",
        ],
        "printed_to_sketch",
        7,
        True,
    ),
    # 2 shots x 10 classes = 20 images, batch 6: steps of 6, 6, 6 (the last 2 dropped) -> stop in epoch 0 after step 2
    "dapt": (
        [
            "method=dapt",
            "method.epochs=2",
            "shots=2",
            "method.n_visual=2",
            "method.n_ctx=2",
            "method.batch_size=6",
            "target=sketch",
        ],
        "sketch",
        2,
        True,
    ),
    # DomainBed's ERM on a random ResNet-18 at 32 px: 4 steps in evaluation periods of 1, 2 and 1 step
    # (a point after every step and at every period's end) -> stop after the second step of period 1
    "erm": (
        [
            "method=erm",
            *RESNET,
            "backbone.model=resnet18",
            "method.steps=4",
            "method.checkpoint_freq=2",
            "method.batch_size=2",
            "target=sketch",
        ],
        "sketch",
        4,
        True,
    ),
    # DomainFusion in the paper's setting (a classifier, the tiny LDM in SD's layout): periods of 1 and 2
    # steps, an augmentation round (3 batches of 16) before period 1 -> stop after period 1's first step
    "domainfusion": (
        DF := [
            "method=domainfusion",
            "method.ldm={sd}",
            *RESNET,
            "backbone.model=resnet18",
            "method.steps=3",
            "method.checkpoint_freq=2",
            "method.batch_size=2",
            "method.augment_every=1",
            "method.candidates=2",
            "method.img2img_steps=4",
            "method.distill_per_step=2",
            "method.synthetic_fraction=0.25",
            "target=sketch",
        ],
        "sketch",
        6,
        True,
    ),
    # the same on the ResNet-50 itself (slow: a few ResNet-50 steps and checkpoints on the CPU)
    "domainfusion_resnet50": ([a for a in DF if a != "backbone.model=resnet18"], "sketch", 6, True),
    # the CLIP-encoder variant on a frozen encoder, stopped inside the augmentation round at the start of
    # period 1 (2 points in period 0, then one per generated batch of 16): the round resumes from its files
    "domainfusion_round": (
        [
            "method=domainfusion",
            "method.ldm={ldm}",
            "method.steps=3",
            "method.checkpoint_freq=2",
            "method.augment_every=1",
            "method.candidates=2",
            "method.img2img_steps=4",
            "method.distill_per_step=4",
            "method.train_encoder=false",
            "target=sketch",
        ],
        "sketch",
        4,
        False,
    ),
}


REAL_PREEMPT_POINT = TrainContext.stop_point


def _signal_at_preempt_point(monkeypatch, n: int, sig=signal.SIGUSR1) -> list:
    """Deliver a real signal to this process just before the n-th preempt point (the engine's
    handler sets the flag; the point then checkpoints and stops). Undo: ``_unhook``."""
    real, calls = REAL_PREEMPT_POINT, []

    def counting(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), sig)
        return real(self, *a, **k)

    monkeypatch.setattr(TrainContext, "stop_point", counting)
    return calls


def _unhook(monkeypatch):
    # (not monkeypatch.undo(): it would also drop run_cli's PROMPTDG_CACHE / PROMPTDG_OUT)
    monkeypatch.setattr(TrainContext, "stop_point", REAL_PREEMPT_POINT)


def _model(rec, split):
    return load_file(str(Path(rec["run_dir"]) / "splits" / split / "model.safetensors"))


def _assert_same(resumed, reference, split, tol=1e-6):
    assert resumed["status"] == "finished"
    assert resumed["accuracy"] == reference["accuracy"]
    assert resumed["val_accuracy"] == reference["val_accuracy"]
    a, b = _model(resumed, split), _model(reference, split)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"{resumed['method']}: largest tensor difference resumed vs uninterrupted: {worst:.3g}")
    assert worst <= tol, worst


SLOW = {"domainfusion_resnet50"}


# every built-in method that trains (from its configs: conf/method, conf/debug) and the scenarios above
SCENARIOS = sorted(set(trained_methods()) | set(CASES))


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in SCENARIOS])
def test_signal_stops_at_a_checkpoint_and_the_rerun_equals_an_uninterrupted_run(
    run_cli, monkeypatch, tmp_path, method, request
):
    """A scenario of CASES, or a method's tiny run from its configs (``tiny_args``): then the signal
    comes at the middle one of the uninterrupted run's preempt points."""
    if method in CASES:
        args, split, at, mid_epoch = CASES[method]
    else:
        args, split, at, mid_epoch = tiny_args(method, request), None, None, None
    clip = (
        "backbone=resnet50_imagenet" not in args
        and "clip" in method_class({"name": method.split("_round")[0].split("_resnet50")[0]}).backbone_kinds
    )
    if method.startswith("domainfusion"):
        fixture = "tiny_ldm_dir" if clip else "tiny_sd_dir"
        args = [a.format(ldm=request.getfixturevalue(fixture), sd=request.getfixturevalue(fixture)) for a in args]
    run_cli = functools.partial(run_cli, clip=clip)  # (a classifier backbone: no CLIP weights file)
    points = _signal_at_preempt_point(monkeypatch, 10**9)  # (counts the uninterrupted run's points, never signals)
    code, _, err, out_root = run_cli("train", *args)
    assert code == 0, err
    (reference,) = results(out_root)
    _unhook(monkeypatch)
    if at is None:
        assert len(points) >= 3, f"{method}'s tiny run has {len(points)} preempt points: too few to stop in the middle"
        at = len(points) // 2 + 1
        (split,) = [p.name for p in (Path(reference["run_dir"]) / "splits").iterdir()]

    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "preempted"))
    before = signal.getsignal(signal.SIGUSR1)
    calls = _signal_at_preempt_point(monkeypatch, at)
    code, _, err, _ = run_cli("train", *args)
    assert code == 128 + signal.SIGUSR1, err  # non-zero: the job did not finish
    assert len(calls) == at  # stopped at the very point the signal preceded
    assert signal.getsignal(signal.SIGUSR1) == before  # the engine's handler is gone again
    (stopped,) = results(tmp_path / "preempted")
    assert stopped["status"] == "preempted" and "SIGUSR1" in stopped["error"]  # resumable, not "failed"
    run_dir = Path(stopped["run_dir"])
    assert not (run_dir / ".lock").exists()
    state = torch.load(run_dir / "splits" / split / "checkpoint.pt", weights_only=True)
    if mid_epoch is not None:
        assert bool((state.get("loop") or {}).get("step")) == mid_epoch  # a mid-epoch checkpoint carries the step index
    _unhook(monkeypatch)

    code, _, err, _ = run_cli("train", *args)
    assert code == 0, err
    (resumed,) = results(tmp_path / "preempted")
    # ERM and DomainFusion fine-tune the featurizer with Adam, which rescales each gradient by its running
    # rms: the ~1e-9 float noise of identical CPU runs becomes steps of up to lr (5e-5) on weights whose
    # gradient is ~0, so tensors agree to 1e-4 there (accuracies stay exactly equal); 1e-6 for the others
    _assert_same(resumed, reference, split, tol=1e-6 if clip and not method.startswith("domainfusion") else 1e-4)
    assert not (run_dir / "splits" / split / "checkpoint.pt").exists()
    # every epoch (style, C value) was logged exactly once: the resumed run redid none of them
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(l) for l in (Path(reference["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "style", "C"):
        assert [l[key] for l in lines if key in l] == [l[key] for l in ref_lines if key in l]


def test_dapt_resumes_mid_epoch_reading_only_the_remaining_images(run_cli, monkeypatch, tmp_path):
    """The resumed epoch starts at the batch after the stop: no image of the done batches is loaded again."""
    from promptdg_cli.methods import dapt

    args, split, at, _ = CASES["dapt"]
    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "p"))
    _signal_at_preempt_point(monkeypatch, at)
    code, _, err, _ = run_cli("train", *args)
    assert code == 128 + signal.SIGUSR1, err
    _unhook(monkeypatch)
    loaded, real = [], dapt.image_loader
    monkeypatch.setattr(
        dapt,
        "image_loader",
        lambda paths, tf, batches, *a, **k: loaded.append(batches) or real(paths, tf, batches, *a, **k),
    )
    code, _, err, _ = run_cli("train", *args)
    assert code == 0, err
    # epoch 0 from its third batch (positions 12-17 of the epoch's order), then epoch 1 whole
    assert loaded == [[list(range(12, 18))], [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]]


def test_sigterm_from_outside_stops_a_cli_process_and_the_rerun_resumes(
    run_cli, random_clip, shared_cache, tmp_path, monkeypatch
):
    """A real SIGTERM from another process, at whatever step the run is in: exit 143, a resumable
    record, and the rerun equals an uninterrupted run."""
    args = ["method=coop", "method.epochs=4", "method.n_ctx=4", "method.batch_size=8", "target=photo"]
    code, _, err, out_root = run_cli("train", *args)
    assert code == 0, err
    (reference,) = results(out_root)

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROMPTDG_CACHE": str(shared_cache), "PROMPTDG_OUT": str(out)}
    cmd = [sys.executable, "-m", "promptdg_cli", "train", *TINY, f"backbone.pretrained={random_clip}", *args]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not list(out.rglob("metrics.jsonl")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        # the first epoch is logged: the run is training (its order is seeded, so any step will do)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    assert rc == 128 + signal.SIGTERM, (tmp_path / "log").read_text()[-3000:]
    (stopped,) = results(out)
    assert stopped["status"] == "preempted"
    assert list(out.rglob("checkpoint.pt"))

    monkeypatch.setenv("PROMPTDG_OUT", str(out))
    code, _, err, _ = run_cli("train", *args)
    assert code == 0, err
    (resumed,) = results(out)
    _assert_same(resumed, reference, "photo")


def test_a_failure_is_still_failed_and_sigint_is_not_preemption(run_cli, monkeypatch):
    """Only the preemption signals stop at a checkpoint; an error or Ctrl-C still ends as "failed"."""
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt("Ctrl-C")

    monkeypatch.setattr(TrainContext, "stop_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli("train", *CASES["coop"][0])
    _unhook(monkeypatch)
    (rec,) = results(Path(os.environ["PROMPTDG_OUT"]))
    assert rec["status"] == "failed" and "Ctrl-C" in rec["error"]


def test_requeue_through_submitit_resumes(run_cli, random_clip, shared_cache, tmp_path):
    """hydra-submitit-launcher (local executor): submitit's preemption signal (SIGUSR2) reaches the
    job while it trains; our handler finishes the step and writes the checkpoint, then hands the
    signal on to submitit's handler, which checkpoints the launcher, requeues the job (the local
    executor restarts it) and exits; the requeued job resumes and the sweep finishes with the
    results of an uninterrupted run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = ["method=coop", "method.epochs=3", "method.n_ctx=4", "target=sketch"]
    code, _, err, out_root = run_cli("train", *args)
    assert code == 0, err
    (reference,) = results(out_root)

    # the job sends itself submitit's signal at its 9th preempt point, in its first attempt only
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('SUBMITIT_LOCAL_JOB_ID') and not os.path.exists(os.environ['PDG_SIGNALLED']):\n"
        "    import promptdg_cli.training as e\n"
        "    real, calls = e.TrainContext.stop_point, []\n"
        "    def hooked(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 9:\n"
        "            open(os.environ['PDG_SIGNALLED'], 'w').close()\n"
        "            os.kill(os.getpid(), signal.SIGUSR2)\n"
        "        return real(self, *a, **k)\n"
        "    e.TrainContext.stop_point = hooked\n"
    )
    out = tmp_path / "sweep"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PROMPTDG_CACHE": str(shared_cache),
        "PROMPTDG_OUT": str(out),
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "PDG_SIGNALLED": str(tmp_path / "signalled"),
    }
    # (the local executor allows 3 requeues after a timeout: submitit counts a signal within the last
    # 10 minutes of timeout_min as one)
    cmd = [
        sys.executable,
        "-m",
        "promptdg_cli",
        "train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.name=promptdg_preempt_test",
        *TINY,
        f"backbone.pretrained={random_clip}",
        *args,
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted(out.rglob(".submitit/*/*_log.*")))
    assert r.returncode == 0, r.stderr[-3000:] + logs[-3000:]
    assert (tmp_path / "signalled").exists()
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs  # submitit's own handler ran
    (rec,) = [x for x in results(out) if x.get("method") == "coop"]
    _assert_same(rec, reference, "sketch")
    metrics = [json.loads(l) for l in (Path(rec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if "epoch" in m] == [0, 1, 2]  # epoch 1 was finished after the requeue


def test_signal_outside_training_stops_at_once_and_the_rerun_does_not_retrain(run_cli, monkeypatch, tmp_path):
    """During the evaluation nothing is left to checkpoint: the run stops right away (status
    "preempted"); the final checkpoint is kept until the split's result is written, so the rerun
    only evaluates again."""
    from promptdg_cli import evaluation, runner

    args = (*CASES["coop"][0], "method.select=val")  # (validations in fit: the signal comes after them)
    code, _, err, out_root = run_cli("train", *args)
    assert code == 0, err
    (reference,) = results(out_root)

    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "p"))
    real_eval, calls = evaluation.evaluate, []

    def evaluate_and_get_signalled(method, feats, **kw):
        calls.append(1)
        if len(calls) == 4:  # 3 validations in fit (one per epoch), then the test domain's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not reached: the handler stops the run at once")
        return real_eval(method, feats, **kw)

    monkeypatch.setattr(evaluation, "evaluate", evaluate_and_get_signalled)
    monkeypatch.setattr(runner, "evaluate", evaluate_and_get_signalled)
    code, _, err, _ = run_cli("train", *args)
    assert code == 128 + signal.SIGTERM, err
    (stopped,) = results(tmp_path / "p")
    assert stopped["status"] == "preempted"
    monkeypatch.setattr(evaluation, "evaluate", real_eval)
    monkeypatch.setattr(runner, "evaluate", real_eval)
    steps = _signal_at_preempt_point(monkeypatch, 10**9)  # counts the safe points, never signals
    code, _, err, _ = run_cli("train", *args)
    assert code == 0, err
    assert steps == []  # no training step, no epoch: fit found its last epoch's checkpoint
    (resumed,) = results(tmp_path / "p")
    _assert_same(resumed, reference, "sketch")
