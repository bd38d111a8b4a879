"""torchrun with 2 processes on the CPU (gloo) trains like one process.

Each rank takes its shard of every global batch; the loss of a rank is its share of the global
batch mean and the gradients are summed (CoOp, DAPL: the prompt learner in DDP with a summing
communication hook; DAPT: ``sync_grads`` on its two prompt tensors), so the updates are those of a
single process up to float rounding. The batch sizes below leave uneven last batches (CoOp: 3 ->
2 + 1, DAPT: 7 -> 4 + 3) and, for DAPL, a last source batch of one image (one rank has nothing).
The linear probe shares the C values out over the ranks: its fits are deterministic.

Tolerance (stated; observed differences are far smaller, see the report of the change): accuracies
equal, learned tensors within 1e-5 (linear probe: exactly equal).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import RESNET, TINY, results, tiny_args, trained_methods

pytest.importorskip("torch.distributed.run")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

CASES = {
    "linear_probe": (["method=linear_probe", "method.c_max=100", "method.refine_steps=4", "target=sketch"], "sketch"),
    # (drop_last=false: the uneven last batches are the point here)
    # 192 source images, batch 27: 7 batches of 27 (14 + 13) and one of 3 (2 + 1)
    "coop": (
        [
            "method=coop",
            "method.epochs=2",
            "method.n_ctx=4",
            "method.batch_size=27",
            "method.drop_last=false",
            "target=sketch",
        ],
        "sketch",
    ),
    # UDA printed -> sketch: 64 source images, batch 9: the last batch holds 1 image (rank 1: none)
    "dapl": (
        [
            "method=dapl",
            "method.epochs=2",
            "method.n_ctx=2",
            "method.n_dom_ctx=2",
            "method.batch_size=9",
            "method.target_batch_size=7",
            "method.drop_last=false",
            "source=[printed]",
            "target=sketch",
        ],
        "printed_to_sketch",
    ),
    # 2 shots x 10 classes = 20 images, batch 7: 7 (4 + 3), 7, 6 (3 + 3); the test domain re-encoded by both ranks
    "dapt": (
        [
            "method=dapt",
            "method.epochs=2",
            "shots=2",
            "method.n_visual=2",
            "method.n_ctx=2",
            "method.batch_size=7",
            "method.lr=0.5",
            "method.drop_last=false",
            "target=sketch",
        ],
        "sketch",
    ),
    # the same 20 images in batches of 19: the last batch holds 1 image, so rank 1's shard is empty (it
    # computes no loss, yet joins every collective of the step: the run must finish, not hang)
    "dapt_empty_shard": (
        [
            "method=dapt",
            "method.epochs=2",
            "shots=2",
            "method.n_visual=2",
            "method.n_ctx=2",
            "method.batch_size=19",
            "method.lr=0.5",
            "method.drop_last=false",
            "target=sketch",
        ],
        "sketch",
    ),
    # DomainBed's ERM on a random ResNet-18 at 32 px: 3 sources x 5 draws a step (15 = 8 + 7 over the ranks)
    "erm": (
        [
            "method=erm",
            *RESNET,
            "backbone.model=resnet18",
            "method.steps=3",
            "method.checkpoint_freq=2",
            "method.batch_size=5",
            "target=sketch",
        ],
        "sketch",
    ),
    # DomainFusion in the paper's setting (a classifier, the tiny LDM in SD's layout): 3 x 3 source + 3
    # synthetic draws a step (6 + 6), 3 of them distilled (2 on rank 0, 1 on rank 1), the augmentation
    # round before period 1 shared out by batch
    "domainfusion": (
        DF := [
            "method=domainfusion",
            "method.ldm={sd}",
            *RESNET,
            "backbone.model=resnet18",
            "method.steps=3",
            "method.checkpoint_freq=2",
            "method.batch_size=3",
            "method.augment_every=1",
            "method.candidates=2",
            "method.img2img_steps=4",
            "method.distill_per_step=3",
            "method.synthetic_fraction=0.25",
            "target=sketch",
        ],
        "sketch",
    ),
    "domainfusion_resnet50": ([a for a in DF if a != "backbone.model=resnet18"], "sketch"),
}
ATOL = 1e-5
ADAM_LR, ADAM_STEPS = 5e-5, 3  # erm.yaml's lr (DomainBed's) and the method.steps=3 of the ERM and DomainFusion cases


def torchrun(args, out: Path, random_clip, shared_cache, log: Path, nproc: int = 2, env=None) -> int:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PROMPTDG_CACHE": str(shared_cache), "PROMPTDG_OUT": str(out),
         "OMP_NUM_THREADS": "1", **(env or {})}
    clip = [] if "backbone=resnet50_imagenet" in args else [f"backbone.pretrained={random_clip}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "promptdg_cli", "train", *TINY, *clip, *args]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=log.parent, env=e, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode


def compare(rec, ref, split, atol=ATOL) -> float:
    """Asserts the tolerance; returns the largest difference of a learned tensor."""
    assert rec["status"] == "finished"
    assert rec["accuracy"] == ref["accuracy"], (rec["accuracy"], ref["accuracy"])
    assert rec["val_accuracy"] == ref["val_accuracy"]
    a = load_file(str(Path(rec["run_dir"]) / "splits" / split / "model.safetensors"))
    b = load_file(str(Path(ref["run_dir"]) / "splits" / split / "model.safetensors"))
    worst = max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)
    assert worst <= atol, worst
    return worst


def _one_writer(run_dir: Path, ref_dir: Path):
    """Rank 0 alone wrote: one metrics line per line of the single-process run, no lock left."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    ref = (ref_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k in ("epoch", "C", "shots")} for l in ls]
    assert strip(lines) == strip(ref)
    assert not (run_dir / ".lock").exists()


# every built-in method that trains on images (PromptStyler trains on none: the same on every rank), from
# its configs (tiny_args) unless CASES gives it a scenario with uneven batches
SCENARIOS = sorted((set(trained_methods()) - {"promptstyler"}) | set(CASES))


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m.endswith("resnet50") else m for m in SCENARIOS]
)
def test_two_processes_match_one(run_cli, random_clip, shared_cache, tmp_path, method, request):
    args, split = CASES[method] if method in CASES else (tiny_args(method, request), None)
    if method.startswith("domainfusion"):
        args = [a.format(sd=request.getfixturevalue("tiny_sd_dir")) for a in args]
    threads = torch.get_num_threads()
    if method == "linear_probe":  # the ranks' thread count (torchrun: one each), so that float32 sums in the same order
        torch.set_num_threads(1)
    try:
        # one process (also fills the feature cache)
        code, _, err, out_root = run_cli("train", *args, clip="backbone=resnet50_imagenet" not in args)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    (ref,) = results(out_root)
    if split is None:
        (split,) = [p.name for p in (Path(ref["run_dir"]) / "splits").iterdir()]

    log = tmp_path / "torchrun.log"
    rc = torchrun(args, tmp_path / "ddp", random_clip, shared_cache, log)
    assert rc == 0, log.read_text()[-4000:]
    (rec,) = results(tmp_path / "ddp")
    # same config, same key
    assert rec["run_dir"] != ref["run_dir"] and Path(rec["run_dir"]).name == Path(ref["run_dir"]).name
    # ERM and DomainFusion fine-tune the featurizer with Adam, whose update is lr * m_hat / sqrt(v_hat): about
    # +-lr wherever a gradient is summation-order noise (~1e-9) whose sign differs between the two runs. So a
    # weight can differ by up to 2 lr per step: 2 x 5e-5 x 3 steps, plus float32 rounding of the weights
    # (observed: 1.00002e-4 under AVX2 kernels, one flipped step); accuracies exactly equal
    adam = 2 * ADAM_LR * ADAM_STEPS + 1e-6
    worst = compare(rec, ref, split, atol=adam if method.startswith(("erm", "domainfusion")) else ATOL)
    print(f"{method}: largest tensor difference 2 ranks vs 1 process: {worst:.3g}")
    if method == "linear_probe":  # every rank fits the single process's sequence, bit for bit at one thread
        assert worst == 0.0
    _one_writer(Path(rec["run_dir"]), Path(ref["run_dir"]))


def test_signal_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes(
    run_cli, random_clip, shared_cache, tmp_path
):
    """SIGTERM reaches rank 1 only (mid-epoch); the ranks agree to stop at the same step, rank 0
    writes the checkpoint, the job exits non-zero with a resumable record; torchrun again resumes
    and matches one uninterrupted process."""
    args, split = CASES["coop"]
    code, _, err, out_root = run_cli("train", *args)
    assert code == 0, err
    (ref,) = results(out_root)

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('RANK') == '1' and os.environ.get('PDG_SIGNAL_AT'):\n"
        "    import promptdg_cli.training as e\n"
        "    real, calls = e.TrainContext.stop_point, []\n"
        "    def hooked(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == int(os.environ['PDG_SIGNAL_AT']):\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return real(self, *a, **k)\n"
        "    e.TrainContext.stop_point = hooked\n"
    )
    out = tmp_path / "ddp"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]), "PDG_SIGNAL_AT": "12"}
    rc = torchrun(args, out, random_clip, shared_cache, tmp_path / "stopped.log", env=env)
    assert rc != 0
    (stopped,) = results(out)
    assert stopped["status"] == "preempted" and "SIGTERM" in stopped["error"], stopped
    state = torch.load(next(out.rglob("checkpoint.pt")), weights_only=True)["loop"]
    # 8 steps + 1 epoch checkpoint per epoch: the 12th point is epoch 1, step 3
    assert (state["epoch"], state["step"]) == (1, 3)

    rc = torchrun(args, out, random_clip, shared_cache, tmp_path / "resumed.log")
    assert rc == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    (rec,) = results(out)
    compare(rec, ref, split)
    _one_writer(Path(rec["run_dir"]), Path(ref["run_dir"]))
