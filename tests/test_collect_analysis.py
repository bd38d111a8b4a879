"""collect's analysis files on hand-written records (no torch): runs.csv in long format read with
pandas, the accuracy-vs-shots points and figure, the training curves of metrics.jsonl."""
from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest
from test_collect import DIGITS, make_record, write

from promptdg_cli.collect import main
from promptdg_cli.collect.long import LONG_FIELDS

PNG = b"\x89PNG\r\n\x1a\n"


def test_runs_csv_has_a_row_per_run_and_target_and_loads_into_pandas(tmp_path):
    write(tmp_path, "a", dict(make_record("coop", "vit_b16", 1, {"sketch": 61.5, "photo": 70.25}), shots=4))
    uda = make_record("dapl", "vit_b16", 2, {"printed→sketch": 55.0}, protocol="uda", targets=["printed→sketch"])
    uda["source_domains"] = {"printed→sketch": ["printed"]}
    write(tmp_path, "b", uda)
    write(tmp_path, "c", make_record("coop", "rn50", 3, {}, targets=["photo"], status="failed", error="OOM"))
    assert main([str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "runs.csv")
    assert tuple(df.columns) == LONG_FIELDS and len(df) == 4  # 2 targets + 1 pair + 1 failed target
    coop = df[(df.method == "coop") & (df.status == "finished")].set_index("target")
    assert coop.loc["sketch", "accuracy"] == 61.5 and coop.loc["photo", "accuracy"] == 70.25
    assert coop.loc["sketch", "source"] == "handwritten+printed+photo+painting"  # the sources in the dataset's order
    assert (
        coop.loc["sketch", "val_accuracy"] == 90.0
        and coop.loc["sketch", "shots"] == 4
        and coop.loc["sketch", "seed"] == 1
    )
    pair = df[df.method == "dapl"].iloc[0]
    assert (pair.source, pair.target, pair.accuracy, pair.protocol) == ("printed", "sketch", 55.0, "uda")
    failed = df[df.status == "failed"].iloc[0]
    assert failed.target == "photo" and math.isnan(failed.accuracy) and failed.backbone == "rn50"
    assert df.accuracy.dtype == float and str(df.seed.dtype).startswith("int")
    assert set(df.run_dir) == {str(tmp_path / n) for n in "abc"}


FEWSHOT = {  # (method, shots, seed) -> accuracy on the test split (a few-shot dataset: one target)
    ("coop", 1, 1): 60.0, ("coop", 1, 2): 64.0, ("coop", 4, 1): 70.0, ("coop", 4, 2): 71.0, ("coop", 16, 1): 80.0,
    ("coop", 16, 2): 83.0, ("dapt", 1, 1): 62.0, ("dapt", 16, 1): 85.0,
}


def _fewshot(root):
    for (method, shots, seed), acc in FEWSHOT.items():
        rec = make_record(
            method,
            "vit_b16",
            seed,
            {"oxford_pets": acc},
            dataset="oxford_pets",
            protocol="fewshot",
            domains=["oxford_pets"],
        )
        write(root, f"{method}{shots}s{seed}", dict(rec, shots=shots))
    zs = make_record(
        "zeroshot",
        "vit_b16",
        1,
        {"oxford_pets": 50.0},
        dataset="oxford_pets",
        protocol="fewshot",
        domains=["oxford_pets"],
    )
    write(root, "zs", zs)
    # one shot count only: no figure for this dataset
    write(
        root,
        "dtd",
        dict(
            make_record("coop", "vit_b16", 1, {"dtd": 40.0}, dataset="dtd", protocol="fewshot", domains=["dtd"]),
            shots=2,
        ),
    )


def test_accuracy_against_shots_per_dataset(tmp_path):
    _fewshot(tmp_path)
    assert main([str(tmp_path)]) == 0
    pts = pd.read_csv(tmp_path / "shots.csv")
    assert set(pts.dataset) == {"oxford_pets"}
    for (method, shots), group in pd.DataFrame(
        [(m, s, a) for (m, s, _), a in FEWSHOT.items()], columns=["m", "s", "a"]
    ).groupby(["m", "s"]):
        row = pts[(pts.label == method) & (pts.shots == shots)].iloc[0]
        assert row["mean"] == pytest.approx(statistics.fmean(group.a)) and row.seeds == len(group)
        assert (math.isnan(row["std"]) if len(group) == 1 else row["std"] == pytest.approx(statistics.stdev(group.a)))
    zero = pts[pts.label == "zeroshot"].iloc[0]
    assert (zero.shots, zero["mean"]) == (0, 50.0)  # zero-shot CLIP at 0 shots
    assert (tmp_path / "shots.png").read_bytes()[:8] == PNG


def test_curves_from_metrics_jsonl(tmp_path, capsys):
    for seed, base in ((1, 2.0), (2, 3.0)):
        name = f"coop{seed}"
        write(tmp_path, name, make_record("coop", "vit_b16", seed, {"sketch": 60.0 + seed}))
        lines = [
            {"time": 1.0, "target": "sketch", "epoch": e, "lr": 0.002, "loss": base / (e + 1), "val_acc": 50.0 + e}
            for e in range(3)
        ]
        # not an epoch line
        lines.append({"time": 2.0, "target": "sketch", "selected_epoch": 2, "selected_val_acc": 52.0})
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    write(tmp_path, "zs", make_record("zeroshot", "vit_b16", 1, {"sketch": 40.0}))  # no metrics.jsonl: nothing
    assert main([str(tmp_path), "--curves"]) == 0
    df = pd.read_csv(tmp_path / "curves.csv")
    assert set(df.metric) == {"lr", "loss", "val_acc"} and len(df) == 2 * 3 * 3
    loss = df[df.metric == "loss"].pivot(index="epoch", columns="seed", values="value")
    assert loss.loc[2, 1] == pytest.approx(2.0 / 3) and loss.loc[0, 2] == pytest.approx(3.0)
    assert set(df.split) == {"sketch"} and set(df.method) == {"coop"}
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert main([str(tmp_path)]) == 0 and "--curves" not in capsys.readouterr().err


def test_curves_without_any_metrics_say_so(tmp_path, capsys):
    write(tmp_path, "zs", make_record("zeroshot", "vit_b16", 1, dict.fromkeys(DIGITS[:2], 40.0)))
    assert main([str(tmp_path), "--curves"]) == 0
    assert "--curves: no metrics.jsonl with epoch lines" in capsys.readouterr().err
    assert not (tmp_path / "curves.csv").exists()
