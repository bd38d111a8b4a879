"""Files cut short by a crash or a full disk: a truncated checkpoint falls back to the previous one
(or the split restarts), a truncated feature file is computed again, a truncated generated PNG is
generated again; each recovery is in the run's record (``recovered``)."""
from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from test_data import dataset_cfg

from promptdg_cli import checkpoints
from promptdg_cli.data import FeatureCache, dataset_dir
from promptdg_cli.methods.domainfusion import DomainFusion
from promptdg_cli.training import TrainContext, make_files

from conftest import method_cfg, results

COOP = ("train", "method=coop", "method.epochs=3", "method.n_ctx=4", "target=sketch")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------- checkpoints
def test_save_keeps_the_previous_checkpoint_and_refuses_one_that_does_not_read_back(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save({"epoch": 0, "w": torch.zeros(3)}, path)
    checkpoints.save({"epoch": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["epoch"] == 0
    # an object weights_only loading refuses: the write fails, both files stay as they were
    with pytest.raises(checkpoints.CheckpointError, match="could not be written and read back"):
        checkpoints.save({"epoch": 2, "odd": Fraction(1, 3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", "checkpoint.prev.pt"])


def _interrupted_coop_run(run_cli, monkeypatch, out: Path) -> Path:
    """The CoOp run stopped (KeyboardInterrupt) after its second epoch checkpoint: the split folder."""
    monkeypatch.setenv("PROMPTDG_OUT", str(out))
    saved, calls = TrainContext._save, []

    def dying_save(self, section, state):
        saved(self, section, state)
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(TrainContext, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*COOP)
    monkeypatch.setattr(TrainContext, "_save", saved)
    (split,) = out.rglob("splits/sketch")
    assert torch.load(split / "checkpoint.pt", weights_only=True)["loop"]["epoch"] == 1
    assert torch.load(split / "checkpoint.prev.pt", weights_only=True)["loop"]["epoch"] == 0
    return split


@pytest.mark.parametrize("broken", ["latest", "both"])
def test_a_truncated_checkpoint_falls_back_to_the_previous_one_or_restarts(run_cli, monkeypatch, tmp_path, broken):
    code, _, err, out_root = run_cli(*COOP)
    assert code == 0, err
    (reference,) = results(out_root)

    split = _interrupted_coop_run(run_cli, monkeypatch, tmp_path / "crashed")
    truncate(split / "checkpoint.pt", keep=0.25)
    if broken == "both":
        truncate(split / "checkpoint.prev.pt", keep=0.8)
    t = time.time()
    code, out, err, _ = run_cli(*COOP)
    elapsed = time.time() - t
    assert code == 0, err
    lines = [l for l in (out + err).splitlines() if "could not be read" in l]
    print(f"\n[truncated checkpoint, {broken}] rerun finished in {elapsed:.1f} s:\n" + "\n".join(lines))
    (rec,) = results(tmp_path / "crashed")
    assert rec["status"] == "finished"
    # resuming from epoch 0's checkpoint, or from scratch, gives the uninterrupted run's result
    assert rec["accuracy"] == reference["accuracy"] and rec["val_accuracy"] == reference["val_accuracy"]
    events = rec["recovered"]
    files = [Path(e["file"]).name for e in events]
    assert files == (["checkpoint.pt"] if broken == "latest" else ["checkpoint.pt", "checkpoint.prev.pt"])
    # (PyTorch's error depends on where the file ends: "failed finding central directory" when the
    # zip's end records are gone, an OSError when a stale one points past the end)
    assert "failed finding central directory" in events[0]["error"]
    assert all(e["error"].startswith(("RuntimeError: ", "OSError: ")) for e in events)
    action = "resumed from checkpoint.prev.pt" if broken == "latest" else "restarted the split from scratch"
    assert all(e["action"].startswith(action) for e in events) and len(lines) == len(events)
    metrics = [json.loads(l) for l in (split.parent.parent / "metrics.jsonl").read_text().splitlines()]
    epochs = [m["epoch"] for m in metrics if "epoch" in m]
    assert epochs == ([0, 1, 1, 2] if broken == "latest" else [0, 1, 0, 1, 2])  # what the rerun trained again
    # no checkpoint left
    assert sorted(p.name for p in split.iterdir()) == ["holdout.json", "model.safetensors", "result.json"]


# --------------------------------------------------------------------- feature cache
def test_a_truncated_feature_file_is_computed_again(clip, tmp_path):
    world = dataset_cfg(tmp_path / "data")
    dataset_dir(world)
    first = FeatureCache(tmp_path / "cache", num_workers=0)
    ref = first.domain_features(clip, world, "sketch")
    (file,) = (tmp_path / "cache" / "features" / "demo_digits").glob("sketch-*.safetensors")
    truncate(file)
    cache = FeatureCache(tmp_path / "cache", num_workers=0)
    got = cache.domain_features(clip, world, "sketch")
    assert (cache.misses, cache.hits) == (1, 0)
    assert torch.equal(got.x, ref.x) and got.paths == ref.paths
    (event,) = cache.recovered
    assert (
        event["file"] == str(file)
        and "incomplete metadata" in event["error"]
        and event["action"] == "deleted and computed again"
    )
    again = FeatureCache(tmp_path / "cache", num_workers=0)
    again.domain_features(clip, world, "sketch")
    assert (again.hits, again.recovered) == (1, [])  # the file written again reads


def test_a_run_records_the_feature_file_it_computed_again(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTDG_CACHE", str(tmp_path / "cache"))  # (the shared cache stays intact)
    args = ("train", "method=zeroshot", "target=sketch")
    code, _, err, out_root = run_cli(*args)
    assert code == 0, err
    (first,) = results(out_root)
    (file,) = (tmp_path / "cache" / "features" / "demo_digits").glob("sketch-*.safetensors")
    truncate(file, keep=0.9)
    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "second"))
    t = time.time()
    code, out, err, _ = run_cli(*args)
    (line,) = [l for l in (out + err).splitlines() if "could not be read" in l]
    print(f"\n[truncated feature file] run finished in {time.time() - t:.1f} s: {line}")
    assert code == 0, err
    (rec,) = results(tmp_path / "second")
    assert rec["accuracy"] == first["accuracy"] and rec["feature_cache"]["misses"] == 1
    assert [(e["file"], e["action"]) for e in rec["recovered"]] == [(str(file), "deleted and computed again")]
    assert first["recovered"] == []


# --------------------------------------------------------------------- DomainFusion's generated images
def test_a_truncated_png_of_an_augmentation_round_is_generated_again(clip, tiny_ldm_dir, tmp_path):
    world = dataset_cfg(tmp_path / "data", per_class=1)
    root = dataset_dir(world)
    inputs = sorted(str(p) for p in (root / "sketch").rglob("*.png"))[:6]
    labels = list(range(6))
    cfg = method_cfg(
        "domainfusion",
        f"ldm={tiny_ldm_dir}",
        "candidates=2",
        "img2img_steps=4",
        "generate_batch=4",
        "train_encoder=false",
    )
    method = DomainFusion(cfg, clip, [f"class {i}" for i in range(10)], torch.device("cpu"))
    outs = [tmp_path / "round1" / f"{k:06d}.png" for k in range(6)]
    assert method.write_round(inputs, labels, outs, 5, "round 1", make_files) == []
    ref = {o: o.read_bytes() for o in outs}
    truncate(outs[5])  # batch 2 (images 4, 5) was cut short
    mtimes = {o: o.stat().st_mtime_ns for o in outs}
    events = method.write_round(inputs, labels, outs, 5, "round 1", make_files)
    assert [(e["file"], e["action"]) for e in events] == [(str(outs[5]), "generated again")]
    assert "truncated" in events[0]["error"] or "broken" in events[0]["error"].lower()
    assert {o: o.read_bytes() for o in outs} == ref  # the same seeded batch: the same image
    assert all(o.stat().st_mtime_ns == mtimes[o] for o in outs[:4])  # batch 1 was not redone
    assert outs[5].stat().st_mtime_ns != mtimes[outs[5]]


# --------------------------------------------------------------------- a finished split's files
@pytest.mark.parametrize("damaged", ["result.json", "model.safetensors"])
def test_a_finished_split_whose_files_do_not_read_back_is_computed_again(run_cli, damaged):
    """A held-out domain finished, then its result (or its model) was cut short, e.g. by a full disk;
    the run's results.json is gone: the rerun computes that split again, says so and records it."""
    args = ("train", "method=coop", "method.epochs=1", "method.n_ctx=2", "target=sketch")
    code, _, err, out_root = run_cli(*args)
    assert code == 0, err
    (reference,) = results(out_root)
    run_dir = Path(reference["run_dir"])
    split = run_dir / "splits" / "sketch"
    model_before = (split / "model.safetensors").read_bytes()
    truncate(split / damaged)
    (run_dir / "results.json").unlink()
    code, out, err, _ = run_cli(*args)
    assert code == 0, err
    (line,) = [l for l in (out + err).splitlines() if "could not be read" in l]
    assert f"splits/sketch/{damaged}" in line and "computed the split again" in line
    (rec,) = results(out_root)
    assert rec["status"] == "finished" and rec["accuracy"] == reference["accuracy"]
    (event,) = rec["recovered"]
    assert event["file"] == str(split / damaged) and event["action"] == "computed the split again"
    assert (split / "model.safetensors").read_bytes() == model_before  # the same seeded training, written whole again
    assert json.loads((split / "result.json").read_text())["saved_model"] is True
