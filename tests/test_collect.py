"""Tests of `promptdg collect` on fake results.json files (no torch, no data, no GPU)."""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import pytest

from promptdg_cli import collect
from promptdg_cli.collect import CollectError, collect_tables, load_records, main, parse_filters

DIGITS = ["handwritten", "printed", "sketch", "photo", "painting"]  # painting: never a target
VISDA = ["synthetic", "real"]
ZS = "a photo of a [class]."
ZS_LABEL = f"zeroshot ({ZS})"


def make_record(method, backbone, seed, accuracy, *, dataset="demo_digits", protocol="dg",
                domains=DIGITS, variant="", mpc=None, targets=None, status="finished", error=None):
    targets = list(targets if targets is not None else accuracy)
    rec = {
        "status": status,
        "method": method,
        "variant": variant,
        "dataset": dataset,
        "backbone": backbone,
        "model": "demo-clip-vit",
        "pretrained": "/tmp/demo.pt",
        "protocol": protocol,
        "seed": seed,
        "domains": list(domains),
        "target_domains": targets,
        "source_domains": {t: [d for d in domains if d != t] for t in targets},
        "timings": {"total_s": 1.0},
        "peak_memory_mb": {"cpu_rss": 900.0, "cuda": None},
        "version": "0.1.0",
        "git_revision": "abc123",
        "config_hash": "3fa2c1d0",
    }
    if status == "finished":
        rec["accuracy"] = dict(accuracy)
        rec["avg_accuracy"] = sum(accuracy.values()) / len(accuracy)
        rec["val_accuracy"] = {t: 90.0 for t in targets}
        if mpc is not None:
            rec["mean_per_class_accuracy"] = dict(mpc)
    else:
        rec["error"] = error
    return rec


def write(root: Path, name: str, rec) -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if isinstance(rec, dict):
        rec = dict(rec, run_dir=str(run_dir))
        text = json.dumps(rec)
    else:
        text = rec
    (run_dir / "results.json").write_text(text)
    (run_dir / "train.log").write_text("accuracy 0.0 -- logs must never be parsed\n")


def build_tree(root: Path) -> None:
    """The fixture, with the expected numbers worked out by hand in the tests below.

    demo_digits (dg), 3 seeds:
      zeroshot vit_b16  all-target runs, seeds 1-3, identical numbers (std 0)
      zeroshot rn50     one all-target run, seed 1
      coop vit_b16      single-target runs; photo has only seeds 1, 2
      coop rn50         all-target runs, seeds 1, 2; seed 3 failed
      dapl vit_b16      seed 1 all-target; seeds 2, 3 single-target on sketch and photo only
      linear_probe      seed 1, sketch only
    demo_visda (uda), target "real", with mean-per-class accuracy for two methods.
    """
    for s in (1, 2, 3):
        write(root, f"digits/zeroshot/vit_b16/s{s}", make_record(
            "zeroshot", "vit_b16", s, {"handwritten": 50.0, "printed": 80.0, "sketch": 40.0, "photo": 70.0},
            variant=ZS))
    write(root, "digits/zeroshot/rn50/s1", make_record(
        "zeroshot", "rn50", 1, {"handwritten": 45.0, "printed": 75.0, "sketch": 35.0, "photo": 65.0}, variant=ZS))

    coop = {  # domain -> per-seed values (seed 3 never ran on photo)
        "handwritten": [60.0, 62.0, 64.0],
        "printed": [90.0, 92.0, 94.0],
        "sketch": [60.0, 63.0, 66.0],
        "photo": [70.0, 75.0],
    }
    for domain, values in coop.items():
        for s, v in enumerate(values, start=1):
            write(root, f"digits/coop/vit_b16/s{s}_{domain}", make_record("coop", "vit_b16", s, {domain: v}))

    write(root, "digits/coop/rn50/s1", make_record(
        "coop", "rn50", 1, {"handwritten": 55.0, "printed": 85.0, "sketch": 50.0, "photo": 60.0}))
    write(root, "digits/coop/rn50/s2", make_record(
        "coop", "rn50", 2, {"handwritten": 57.0, "printed": 87.0, "sketch": 52.0, "photo": 62.0}))
    write(
        root,
        "digits/coop/rn50/s3",
        make_record(
            "coop",
            "rn50",
            3,
            {},
            targets=["handwritten", "printed", "sketch", "photo"],
            status="failed",
            error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
            "Traceback (most recent call last):\n  ...",
        ),
    )

    # accuracy keys deliberately not in canonical order
    write(root, "digits/dapl/vit_b16/s1", make_record(
        "dapl", "vit_b16", 1, {"photo": 80.0, "sketch": 70.0, "printed": 93.0, "handwritten": 65.0},
        targets=["handwritten", "printed", "sketch", "photo"]))
    for s, (sk, ph) in {2: (72.0, 81.0), 3: (74.0, 82.0)}.items():
        write(root, f"digits/dapl/vit_b16/s{s}_sketch", make_record("dapl", "vit_b16", s, {"sketch": sk}))
        write(root, f"digits/dapl/vit_b16/s{s}_photo", make_record("dapl", "vit_b16", s, {"photo": ph}))

    write(root, "digits/linear_probe/vit_b16/s1_sketch", make_record("linear_probe", "vit_b16", 1, {"sketch": 75.0}))

    kw = dict(dataset="demo_visda", protocol="uda", domains=VISDA)
    write(root, "visda/zeroshot/s1", make_record("zeroshot", "vit_b16", 1, {"real": 80.0}, mpc={"real": 78.0}, **kw))
    write(root, "visda/dapl/s1", make_record("dapl", "vit_b16", 1, {"real": 85.0}, mpc={"real": 83.0}, **kw))
    write(root, "visda/dapl/s2", make_record("dapl", "vit_b16", 2, {"real": 87.0}, mpc={"real": 86.0}, **kw))
    write(root, "visda/linear_probe/s1", make_record("linear_probe", "vit_b16", 1, {"real": 82.0}, **kw))

    write(root, "broken/run", '{"status": "finished", "method": "coop", "accur')  # corrupt


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "runs"
    build_tree(root)
    return root


@pytest.fixture()
def tables(tree):
    records, skipped = load_records(tree)
    return collect_tables(records)


def digits(tables):
    (t,) = [t for t in tables if t.dataset == "demo_digits" and t.metric == "accuracy"]
    return t


def assert_cell(cell, mean, std, n):
    assert cell.n == n
    assert cell.mean == pytest.approx(mean)
    if std is None:
        assert cell.std is None
    else:
        assert cell.std == pytest.approx(std)


# ---------------------------------------------------------------------------------------------


def test_load_records_skips_corrupt(tree):
    records, skipped = load_records(tree)
    # 3+1 zeroshot, 11 coop vit, 3 coop rn50 (1 failed), 1+4 dapl, 1 linear probe, 4 visda
    assert len(records) == 28
    assert len(skipped) == 1
    assert skipped[0][0].endswith("broken/run/results.json")
    assert "invalid JSON" in skipped[0][1]


def test_table_layout(tables):
    assert [(t.dataset, t.protocol, t.metric) for t in tables] == [
        ("demo_digits", "dg", "accuracy"),
        ("demo_visda", "uda", "accuracy"),
        ("demo_visda", "uda", "mean_per_class_accuracy"),
    ]
    t = digits(tables)
    # canonical order from `domains` (not alphabetical, not first-seen); painting never tested
    assert t.columns == ["handwritten", "printed", "sketch", "photo"]
    assert [(r.label, r.backbone) for r in t.rows] == [
        (ZS_LABEL, "rn50"),
        (ZS_LABEL, "vit_b16"),
        ("coop", "rn50"),
        ("coop", "vit_b16"),
        ("dapl", "vit_b16"),
        ("linear_probe", "vit_b16"),
    ]
    assert t.max_seeds == 3


def test_numbers_by_hand(tables):
    t = digits(tables)
    # zero-shot: same numbers for each seed -> std 0; one seed -> no std
    assert_cell(t.cell(ZS_LABEL, "vit_b16", "sketch"), 40.0, 0.0, 3)
    assert_cell(t.cell(ZS_LABEL, "vit_b16", "Avg"), 60.0, 0.0, 3)
    assert_cell(t.cell(ZS_LABEL, "rn50", "photo"), 65.0, None, 1)
    assert_cell(t.cell(ZS_LABEL, "rn50", "Avg"), 55.0, None, 1)

    # coop vit_b16: merged from 11 single-target runs
    assert_cell(t.cell("coop", "vit_b16", "handwritten"), 62.0, 2.0, 3)  # 60, 62, 64
    assert_cell(t.cell("coop", "vit_b16", "printed"), 92.0, 2.0, 3)  # 90, 92, 94
    assert_cell(t.cell("coop", "vit_b16", "sketch"), 63.0, 3.0, 3)  # 60, 63, 66
    assert_cell(t.cell("coop", "vit_b16", "photo"), 72.5, math.sqrt(12.5), 2)  # 70, 75
    # Avg: seed 1 = (60+90+60+70)/4 = 70, seed 2 = (62+92+63+75)/4 = 73; seed 3 lacks photo
    avg = t.cell("coop", "vit_b16", "Avg")
    assert_cell(avg, 71.5, math.sqrt(4.5), 2)
    assert avg.seeds == (1, 2)
    assert t.row("coop", "vit_b16").max_seeds == 3

    # coop rn50: 2 finished seeds, the failed seed is never averaged
    assert_cell(t.cell("coop", "rn50", "handwritten"), 56.0, math.sqrt(2), 2)
    assert_cell(t.cell("coop", "rn50", "Avg"), 63.5, math.sqrt(2), 2)  # 62.5, 64.5

    # dapl: all-target run for seed 1 merged with single-target runs for seeds 2, 3
    assert_cell(t.cell("dapl", "vit_b16", "handwritten"), 65.0, None, 1)
    assert_cell(t.cell("dapl", "vit_b16", "sketch"), 72.0, 2.0, 3)  # 70, 72, 74
    assert_cell(t.cell("dapl", "vit_b16", "photo"), 81.0, 1.0, 3)  # 80, 81, 82
    assert_cell(t.cell("dapl", "vit_b16", "Avg"), 77.0, None, 1)  # (65+93+70+80)/4

    # linear probe: only sketch -> other cells and Avg missing
    lp = t.row("linear_probe", "vit_b16")
    assert [lp.cells[c].n for c in t.columns] == [0, 0, 1, 0]
    assert lp.avg.n == 0 and lp.avg.mean is None

    # failed runs are listed, not averaged
    assert len(t.failed) == 1
    f = t.failed[0]
    assert (f.label, f.backbone, f.seed) == ("coop", "rn50", 3)
    assert f.error == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert f.run_dir.endswith("digits/coop/rn50/s3")
    assert not f.superseded


def test_mean_per_class_table(tables):
    acc = [t for t in tables if t.dataset == "demo_visda" and t.metric == "accuracy"][0]
    mpc = [t for t in tables if t.dataset == "demo_visda" and t.metric == "mean_per_class_accuracy"][0]
    assert acc.columns == mpc.columns == ["synthetic→real"]  # uda: source→target pair columns
    assert [r.label for r in acc.rows] == ["zeroshot", "dapl", "linear_probe"]  # variant "" -> bare name
    assert [r.label for r in mpc.rows] == ["zeroshot", "dapl"]  # linear probe reported no mpc
    assert_cell(acc.cell("dapl", "vit_b16", "synthetic→real"), 86.0, math.sqrt(2), 2)
    assert_cell(mpc.cell("dapl", "vit_b16", "synthetic→real"), 84.5, math.sqrt(4.5), 2)
    assert_cell(mpc.cell("zeroshot", "vit_b16", "Avg"), 78.0, None, 1)


def test_markdown_marks(tables):
    md = collect.render_markdown(tables)
    assert "### demo_digits (dg) — top-1 accuracy (%)" in md
    assert "sample standard deviation (ddof=1)" in md
    assert "| Method | Backbone | handwritten | printed | sketch | photo | Avg |" in md
    assert (f"| {ZS_LABEL} | vit_b16 | 50.0 ± 0.0 | 80.0 ± 0.0 | 40.0 ± 0.0 | 70.0 ± 0.0 | 60.0 ± 0.0 |") in md
    assert (f"| {ZS_LABEL} (1/3 seeds) | rn50 | 45.0 | 75.0 | 35.0 | 65.0 | 55.0 |") in md
    assert ("| coop | vit_b16 | 62.0 ± 2.0 | 92.0 ± 2.0 | 63.0 ± 3.0 | 72.5 ± 3.5 (2/3 seeds) "
            "| 71.5 ± 2.1 (2/3 seeds) |") in md
    assert "| coop (2/3 seeds) | rn50 | 56.0 ± 1.4 | 86.0 ± 1.4 | 51.0 ± 1.4 | 61.0 ± 1.4 | 63.5 ± 1.4 |" in md
    assert ("| dapl | vit_b16 | 65.0 (1/3 seeds) | 93.0 (1/3 seeds) | 72.0 ± 2.0 | 81.0 ± 1.0 "
            "| 77.0 (1/3 seeds) |") in md
    assert "| linear_probe (1/3 seeds) | vit_b16 | – | – | 75.0 | – | – |" in md
    assert "Failed runs: 1" in md
    assert "CUDA out of memory" in md and "Traceback" not in md
    assert "### demo_visda (uda) — mean per-class accuracy (%)" in md


def test_filters(tables, tree):
    records, _ = load_records(tree)
    t = digits(collect_tables(records, parse_filters(["method=coop,dapl", "backbone=vit_b16"])))
    assert [(r.label, r.backbone) for r in t.rows] == [("coop", "vit_b16"), ("dapl", "vit_b16")]
    assert t.failed == []  # the failed run is rn50

    t = digits(collect_tables(records, parse_filters(["seed=1"])))
    assert_cell(t.cell("coop", "vit_b16", "sketch"), 60.0, None, 1)
    assert_cell(t.cell("coop", "vit_b16", "Avg"), 70.0, None, 1)

    t = digits(collect_tables(records, parse_filters([f"label={ZS_LABEL}"])))
    assert {r.method for r in t.rows} == {"zeroshot"}

    t = digits(collect_tables(records, parse_filters(["domain=photo,sketch", "method=dapl"])))
    assert t.columns == ["sketch", "photo"]
    assert_cell(t.cell("dapl", "vit_b16", "Avg"), 76.5, 1.5, 3)  # 75, 76.5, 78

    with pytest.raises(CollectError, match="valid keys: method, variant"):
        parse_filters(["optimizer=sgd"])
    with pytest.raises(CollectError, match="key=value"):
        parse_filters(["coop"])


def test_main_writes_outputs(tree, capsys):
    assert main([str(tree)]) == 0
    out, err = capsys.readouterr()
    assert "| coop | vit_b16 | 62.0 ± 2.0 |" in out
    assert "skipped 1 unreadable or invalid results.json" in err
    for name in ("results.md", "results.csv", "results.tex", "results.png"):
        assert (tree / name).stat().st_size > 0, name
    assert (tree / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out in (tree / "results.md").read_text()

    rows = list(csv.DictReader(io.StringIO((tree / "results.csv").read_text())))
    assert list(rows[0]) == ["dataset", "protocol", "metric", "method", "backbone", "domain", "mean", "std", "n_seeds"]
    by_key = {(r["dataset"], r["metric"], r["method"], r["backbone"], r["domain"]): r for r in rows}
    sk = by_key[("demo_digits", "accuracy", "coop", "vit_b16", "sketch")]
    assert (float(sk["mean"]), float(sk["std"]), int(sk["n_seeds"])) == (63.0, 3.0, 3)
    ph = by_key[("demo_digits", "accuracy", "coop", "vit_b16", "photo")]
    assert float(ph["mean"]) == 72.5 and float(ph["std"]) == pytest.approx(math.sqrt(12.5), abs=1e-4)
    assert ph["n_seeds"] == "2"
    avg = by_key[("demo_digits", "accuracy", "coop", "vit_b16", "Avg")]
    assert (float(avg["mean"]), avg["n_seeds"]) == (71.5, "2")
    one = by_key[("demo_digits", "accuracy", ZS_LABEL, "rn50", "sketch")]
    assert (one["mean"], one["std"], one["n_seeds"]) == ("35.0000", "", "1")
    miss = by_key[("demo_digits", "accuracy", "linear_probe", "vit_b16", "handwritten")]
    assert (miss["mean"], miss["n_seeds"]) == ("", "0")
    mpc = by_key[("demo_visda", "mean_per_class_accuracy", "dapl", "vit_b16", "synthetic→real")]
    assert float(mpc["mean"]) == 84.5
    # 6 digits rows x 5 (4 domains + Avg) + visda 3 x 2 + mpc 2 x 2
    assert len(rows) == 6 * 5 + 3 * 2 + 2 * 2

    tex = (tree / "results.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\begin{tabular}{llccccc}" in tex
    assert r"coop & vit\_b16 & 62.0 $\pm$ 2.0 & 92.0 $\pm$ 2.0 & 63.0 $\pm$ 3.0 & 72.5 $\pm$ 3.5" in tex
    assert r"linear\_probe" in tex and "--" in tex
    assert "84.5 $\\pm$ 2.1" in tex


def test_main_filter_and_errors(tree, tmp_path, capsys):
    out_dir = tmp_path / "report"
    assert main([str(tree), "method=coop,dapl", "backbone=vit_b16", "seed=1", "-o", str(out_dir)]) == 0
    rows = list(csv.DictReader(io.StringIO((out_dir / "results.csv").read_text())))
    assert {(r["method"], r["backbone"]) for r in rows} == {("coop", "vit_b16"), ("dapl", "vit_b16")}
    assert {r["n_seeds"] for r in rows} <= {"0", "1"}
    capsys.readouterr()

    assert main([str(tree), "optimizer=sgd"]) == 2
    err = capsys.readouterr().err
    assert "unknown filter key 'optimizer'" in err and "backbone" in err and "seed" in err

    assert main([str(tree), "method=nope"]) == 2
    err = capsys.readouterr().err
    assert "no record" in err and "method values: coop, dapl, linear_probe, zeroshot" in err


def test_zero_records_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "run1").mkdir(parents=True)
    (empty / "run1" / "train.log").write_text("acc 99\n")
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no usable results.json" in err and str(empty) in err
    assert not (empty / "results.md").exists()

    bad = tmp_path / "bad"
    write(bad, "r", "not json")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "skipped 1" in err and str(bad) in err

    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_duplicates_keep_later_record():
    a = make_record("coop", "vit_b16", 1, {"sketch": 50.0})
    b = make_record("coop", "vit_b16", 1, {"sketch": 60.0, "photo": 70.0})
    (t,) = collect_tables([a, b])
    assert_cell(t.cell("coop", "vit_b16", "sketch"), 60.0, None, 1)
    assert len(t.notes) == 1 and "duplicate" in t.notes[0]
    # a failed run later re-run successfully is still listed, marked superseded
    failed = make_record("coop", "vit_b16", 1, {}, targets=["sketch"], status="failed", error="boom")
    (t,) = collect_tables([failed, a])
    assert t.failed[0].superseded and t.failed[0].error == "boom"


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "promptdg collect" in out and "method=coop,dapl backbone=vit_b16 seed=1" in out
    assert "--columns {domain,dataset}" in out and "art+product→clipart" in out


# --- datasets as columns ----------------------------------------------------------------------

PACS = ["art_painting", "cartoon", "photo", "sketch"]
VLCS = ["caltech", "labelme", "pascal", "sun"]


def dataset_records():
    """2 datasets x 2 seeds x 2 methods (vit_b16), numbers worked out by hand in the tests.

    zeroshot  s1: pacs 90,80,100,70 (85)   vlcs 100,60,80,80 (80)
              s2: pacs 92,82,100,78 (88)   vlcs: no run (a missing seed)
    coop      s1: pacs 90,85,100,85 (90) from 4 single-target runs   vlcs 100,70,80,90 (85)
              s2: pacs 94,86,100,88 (92)   vlcs: caltech, labelme, pascal only (no sun) -> incomplete
    """
    def pacs(method, seed, acc, **kw):
        return make_record(method, "vit_b16", seed, acc, dataset="pacs", domains=PACS, **kw)

    def vlcs(method, seed, acc, **kw):
        return make_record(method, "vit_b16", seed, acc, dataset="vlcs", domains=VLCS, **kw)

    return [
        # vlcs first: column order must not be first-seen
        vlcs("zeroshot", 1, dict(zip(VLCS, [100.0, 60.0, 80.0, 80.0])), variant=ZS),
        pacs("zeroshot", 1, dict(zip(PACS, [90.0, 80.0, 100.0, 70.0])), variant=ZS),
        pacs("zeroshot", 2, dict(zip(PACS, [92.0, 82.0, 100.0, 78.0])), variant=ZS),
        *[pacs("coop", 1, {d: v}) for d, v in zip(PACS, [90.0, 85.0, 100.0, 85.0])],
        vlcs("coop", 1, dict(zip(VLCS, [100.0, 70.0, 80.0, 90.0]))),
        pacs("coop", 2, dict(zip(PACS, [94.0, 86.0, 100.0, 88.0]))),
        vlcs("coop", 2, {"caltech": 100.0, "labelme": 50.0}),  # mean 70 over 3 domains if (wrongly) used
        vlcs("coop", 2, {"pascal": 60.0}),
        vlcs("coop", 3, {}, targets=["sun"], status="failed", error="ValueError: bad split\nmore"),
    ]


def test_dataset_columns_numbers_by_hand():
    tables = collect_tables(dataset_records(), columns="dataset")
    assert [(t.dataset, t.protocol, t.metric, t.columns_kind) for t in tables] == [
        ("datasets", "dg", "accuracy", "dataset")]
    (t,) = tables
    assert t.title == "datasets (dg) — top-1 accuracy (%)"
    assert t.columns == ["pacs", "vlcs"]
    assert [(r.label, r.backbone) for r in t.rows] == [(ZS_LABEL, "vit_b16"), ("coop", "vit_b16")]
    assert t.max_seeds == 2

    # zeroshot: pacs 85, 88; vlcs only seed 1 (seed 2 missing); Avg only seed 1: (85 + 80) / 2
    assert_cell(t.cell(ZS_LABEL, "vit_b16", "pacs"), 86.5, math.sqrt(4.5), 2)
    assert_cell(t.cell(ZS_LABEL, "vit_b16", "vlcs"), 80.0, None, 1)
    assert_cell(t.cell(ZS_LABEL, "vit_b16", "Avg"), 82.5, None, 1)
    # coop: seed 1's pacs merges 4 single-target runs (90); seed 2's vlcs lacks sun -> no value,
    # never the biased (100+50+60)/3 = 70
    assert_cell(t.cell("coop", "vit_b16", "pacs"), 91.0, math.sqrt(2), 2)
    vl = t.cell("coop", "vit_b16", "vlcs")
    assert_cell(vl, 85.0, None, 1)
    assert vl.seeds == (1,)
    avg = t.cell("coop", "vit_b16", "Avg")
    assert_cell(avg, 87.5, None, 1)  # (90 + 85) / 2, seed 2 has no vlcs value
    assert avg.seeds == (1,)
    assert any("coop / vit_b16 / seed 2 / vlcs: lacks sun" in n for n in t.notes)

    md = collect.render_markdown(tables)
    assert "### datasets (dg) — top-1 accuracy (%)" in md
    assert "| Method | Backbone | pacs | vlcs | Avg |" in md
    assert f"| {ZS_LABEL} | vit_b16 | 86.5 ± 2.1 | 80.0 (1/2 seeds) | 82.5 (1/2 seeds) |" in md
    assert "| coop | vit_b16 | 91.0 ± 1.4 | 85.0 (1/2 seeds) | 87.5 (1/2 seeds) |" in md
    # the failed run is listed with its dataset, never averaged
    assert len(t.failed) == 1 and t.failed[0].dataset == "vlcs" and t.failed[0].seed == 3
    assert "Failed runs: 1" in md and "/ seed 3 / vlcs / sun: ValueError: bad split" in md

    # the default layout is untouched: one table per dataset, domain columns
    by_domain = collect_tables(dataset_records())
    assert [(x.dataset, x.columns) for x in by_domain] == [("pacs", PACS), ("vlcs", VLCS)]
    assert_cell(by_domain[1].cell("coop", "vit_b16", "caltech"), 100.0, 0.0, 2)

    with pytest.raises(CollectError, match="valid: domain, dataset"):
        collect_tables(dataset_records(), columns="method")


def test_dataset_columns_order_and_avg():
    """Canonical order (DATASET_ORDER, then the rest alphabetically); Avg over seeds with every column."""
    recs = []
    for name in ["zz_custom", "vlcs", "officehome", "aa_custom", "demo_digits", "pacs"]:
        for seed, base in ((1, 60.0), (2, 70.0)):
            recs.append(make_record("coop", "vit_b16", seed, {"d1": base, "d2": base + 2.0},
                                    dataset=name, domains=["d1", "d2"]))
    recs.append(make_record("coop", "vit_b16", 3, {"d1": 80.0, "d2": 82.0}, dataset="pacs", domains=["d1", "d2"]))
    (t,) = collect_tables(recs, columns="dataset")
    assert t.columns == ["pacs", "vlcs", "officehome", "demo_digits", "aa_custom", "zz_custom"]
    assert collect.DATASET_ORDER[:3] == ("pacs", "vlcs", "officehome")
    assert_cell(t.cell("coop", "vit_b16", "pacs"), 71.0, 10.0, 3)  # 61, 71, 81
    assert_cell(t.cell("coop", "vit_b16", "zz_custom"), 66.0, math.sqrt(50), 2)  # 61, 71
    avg = t.cell("coop", "vit_b16", "Avg")  # seed 3 has only pacs -> not in Avg
    assert_cell(avg, 66.0, math.sqrt(50), 2)
    assert avg.seeds == (1, 2)
    md = collect.render_markdown([t])
    assert "| coop | vit_b16 | 71.0 ± 10.0 | 66.0 ± 7.1 (2/3 seeds) |" in md


def test_dataset_columns_equal_domain_avg(tables, tree, capsys):
    """Each dataset cell is that dataset's Avg in the domain layout (fixture tree, incl. uda + mpc)."""
    records, _ = load_records(tree)
    by_ds = collect_tables(records, columns="dataset")
    assert [(t.dataset, t.protocol, t.metric) for t in by_ds] == [
        ("datasets", "dg", "accuracy"),
        ("datasets", "uda", "accuracy"),
        ("datasets", "uda", "mean_per_class_accuracy"),
    ]
    for dom in tables:
        (t,) = [t for t in by_ds if (t.protocol, t.metric) == (dom.protocol, dom.metric)]
        assert t.columns == [dom.dataset]
        assert [(r.label, r.backbone) for r in t.rows] == [(r.label, r.backbone) for r in dom.rows]
        for r in dom.rows:
            cell = t.cell(r.label, r.backbone, dom.dataset)
            assert (cell.values, cell.seeds) == (r.avg.values, r.avg.seeds)
            assert t.cell(r.label, r.backbone, "Avg").values == r.avg.values  # a single column
    dg = by_ds[0]
    assert_cell(dg.cell("coop", "vit_b16", "demo_digits"), 71.5, math.sqrt(4.5), 2)
    assert dg.row("linear_probe", "vit_b16").max_seeds == 0  # sketch only: row kept, cells missing
    assert len(dg.failed) == 1 and dg.failed[0].dataset == "demo_digits"

    out_dir = tree / "by_dataset"
    assert main([str(tree), "--columns", "dataset", "-o", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "### datasets (uda) — mean per-class accuracy (%)" in out
    assert "| Method | Backbone | demo_digits | Avg |" in out
    assert "| coop (2/3 seeds) | vit_b16 | 71.5 ± 2.1 | 71.5 ± 2.1 |" in out
    rows = list(csv.DictReader(io.StringIO((out_dir / "results.csv").read_text())))
    assert list(rows[0]) == list(collect.DATASET_CSV_FIELDS)
    by_key = {(r["protocol"], r["metric"], r["method"], r["backbone"], r["dataset"]): r for r in rows}
    mpc = by_key[("uda", "mean_per_class_accuracy", "dapl", "vit_b16", "demo_visda")]
    assert (float(mpc["mean"]), mpc["n_seeds"]) == (84.5, "2")
    assert len(rows) == 6 * 2 + 3 * 2 + 2 * 2
    assert r"\begin{tabular}{llcc}" in (out_dir / "results.tex").read_text()
    assert (out_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- UDA pair columns ---------------------------------------------------------------------------

OH = ["art", "clipart", "product", "real_world"]


def uda_record(seed, accuracy, sources, *, status="finished", method="dapl", error=None):
    """An Office-Home uda record; ``sources``: target -> source list (None: no source_domains)."""
    rec = make_record(method, "vit_b16", seed, accuracy, dataset="officehome", protocol="uda",
                      domains=OH, status=status, error=error,
                      targets=list(sources) if status != "finished" else None)
    if sources is None:
        del rec["source_domains"]
    else:
        rec["source_domains"] = {t: list(v) for t, v in sources.items()}
    return rec


def test_uda_pair_columns():
    recs = [
        uda_record(1, {"real_world": 80.0}, {"real_world": ["art"]}),
        uda_record(1, {"clipart": 60.0}, {"clipart": ["art"]}),
        uda_record(1, {"art": 70.0}, {"art": ["product"]}),
        uda_record(1, {"clipart": 65.0}, {"clipart": ["product", "art"]}),  # listed out of order
        uda_record(1, {"art": 72.0}, {"art": ["clipart"]}),
        # one record, two targets, each with its own source
        uda_record(1, {"clipart": 50.0, "product": 75.0}, {"clipart": ["real_world"], "product": ["real_world"]}),
        uda_record(1, {"product": 77.0}, None),  # no source_domains: bare target
        uda_record(2, {"clipart": 62.0}, {"clipart": ["art"]}),
        uda_record(1, {}, {"clipart": ["art"]}, status="failed", error="boom"),  # re-run finished
        uda_record(2, {}, {"art": ["product"]}, status="failed", error="oom"),
    ]
    (t,) = collect_tables(recs)
    assert (t.dataset, t.protocol) == ("officehome", "uda")
    assert t.columns == [
        "product",  # no sources known: first
        "art→clipart", "art→real_world", "clipart→art", "product→art",
        "real_world→clipart", "real_world→product",
        "art+product→clipart",  # multi-source after single-source
    ]
    assert t.notes == []  # the three clipart results of seed 1 are different pairs, not duplicates
    assert_cell(t.cell("dapl", "vit_b16", "art→clipart"), 61.0, math.sqrt(2), 2)
    assert_cell(t.cell("dapl", "vit_b16", "art+product→clipart"), 65.0, None, 1)
    assert_cell(t.cell("dapl", "vit_b16", "Avg"), (77 + 60 + 80 + 72 + 70 + 50 + 75 + 65) / 8, None, 1)
    assert collect.column_label(recs[3], "clipart") == "art+product→clipart"
    assert [(f.seed, f.columns, f.superseded) for f in t.failed] == [
        (1, ("art→clipart",), True), (2, ("product→art",), False)]
    md = collect.render_markdown([t])
    assert "| Method | Backbone | product | art→clipart | art→real_world |" in md
    assert "/ seed 2 / product→art: oom" in md

    # `domain=` still selects target domains
    (f,) = collect_tables(recs, parse_filters(["domain=clipart"]))
    assert f.columns == ["art→clipart", "real_world→clipart", "art+product→clipart"]


def test_uda_officehome_12_pairs():
    pairs = [(s, t) for s in OH for t in OH if s != t]
    recs = [uda_record(1, {t: 50.0 + i}, {t: [s]}) for i, (s, t) in enumerate(pairs)]
    (t,) = collect_tables(list(reversed(recs)))  # input order must not matter
    assert t.columns == [f"{s}→{tg}" for s, tg in pairs]
    assert len(t.columns) == 12 and t.columns[:3] == ["art→clipart", "art→product", "art→real_world"]
    assert_cell(t.cell("dapl", "vit_b16", "Avg"), 50.0 + 5.5, None, 1)
    md = collect.render_markdown([t])
    assert "| clipart→art | clipart→product |" in md and md.index("real_world→product") < md.index("| Avg |")


def test_collect_500_records_timing(tmp_path, capsys):
    """Timing only (printed, never asserted): 500 single- and all-target records."""
    root = tmp_path / "many"
    n = 0
    domains = ["handwritten", "printed", "sketch", "photo"]
    for m, method in enumerate(["zeroshot", "coop", "dapl", "dapt", "linear_probe"]):
        for backbone in ("vit_b16", "rn50"):
            for seed in range(1, 11):
                for i, d in enumerate(domains):
                    rec = make_record(method, backbone, seed, {d: 50.0 + m + i + seed / 10})
                    write(root, f"{method}/{backbone}/s{seed}/{d}", rec)
                    n += 1
            write(root, f"{method}/{backbone}/all", make_record(
                method, backbone, 11, {d: 60.0 + m for d in domains}))
            n += 1
    write(root, "visda/s1", make_record("dapl", "vit_b16", 1, {"real": 80.0}, mpc={"real": 79.0},
                                        dataset="demo_visda", protocol="uda", domains=VISDA))
    n += 1
    # top up to exactly 500
    extra = 500 - n
    for k in range(extra):
        write(root, f"extra/{k}", make_record("coop", "vit_l14", k + 1, {"sketch": 70.0 + k % 5}))
    records, _ = load_records(root)
    assert len(records) == 500

    t0 = time.perf_counter()
    records, _ = load_records(root)
    t1 = time.perf_counter()
    tables = collect_tables(records)
    t2 = time.perf_counter()
    assert main([str(root)]) == 0
    t3 = time.perf_counter()
    capsys.readouterr()
    with capsys.disabled():
        print(f"\n[collect timing] 500 records: load {1e3 * (t1 - t0):.0f} ms, tables "
              f"{1e3 * (t2 - t1):.0f} ms, full main() incl. md/csv/tex/png {1e3 * (t3 - t2):.0f} ms "
              f"({len(tables)} tables)")


def test_shot_count_makes_its_own_row():
    from promptdg_cli.collect import collect_tables, method_label

    assert method_label({"method": "dapt", "shots": 16}) == "dapt (16-shot)"
    assert method_label({"method": "coop", "variant": "class-specific", "shots": 4}) == "coop (class-specific, 4-shot)"
    assert method_label({"method": "coop"}) == "coop"
    recs = [
        {"method": "dapt", "dataset": "dtd", "protocol": "fewshot", "backbone": "vit_b16", "seed": s, "shots": k,
         "accuracy": {"dtd": 50.0 + k + s}}
        for k in (1, 16) for s in (1, 2)
    ]
    (table,) = collect_tables(recs)
    assert [r.label for r in table.rows] == ["dapt (1-shot)", "dapt (16-shot)"]
    assert table.cell("dapt (16-shot)", "vit_b16", "dtd").mean == 67.5
