"""The papers' numbers (conf/papers/*.yaml) and `promptdg collect --paper`.

The transcriptions are checked against the papers' own arithmetic (each row's mean against its
printed average; per-dataset values against the per-domain tables' averages), their keys against
conf/, and the command's output against cells worked out by hand. The files are read here with
PyYAML directly, not through promptdg_cli.collect.paper, so a bug in the loader cannot hide a typo.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from promptdg_cli.collect import main

REPO = Path(__file__).resolve().parent.parent
PAPERS = sorted((REPO / "conf" / "papers").glob("*.yaml"))
PACS = ["art_painting", "cartoon", "photo", "sketch"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rows():
    """(file, table, row) for every transcribed row."""
    for path in PAPERS:
        for table in _load(path)["tables"]:
            for row in table["rows"]:
                yield path.name, table, row


ROWS = list(_rows())


def _row_id(item) -> str:
    name, table, row = item
    return f"{name}:{table['table']}:{row['paper_row']}:{row['backbone']}:{row.get('shots')}"


def rounding_bound(decimals: int) -> float:
    """How far the mean of printed values may sit from the printed average, from rounding alone.

    Each printed value is v_i = x_i + e_i with |e_i| <= h, h = 0.5 * 10**-decimals, so the mean of
    the printed values is off the mean of the x_i by |mean(e_i)| <= h; the printed average is that
    mean of the x_i rounded, off by at most h again. Together: 2h (0.1 for one decimal).
    """
    return 2 * 0.5 * 10.0 ** -decimals


def average_error(table: dict, row: dict) -> float:
    over = table.get("average_over", table["columns"])
    values = dict(zip(table["columns"], row["values"]))
    mean = sum(values[c] for c in over) / len(over)
    return abs(mean - row["average"])


# --------------------------------------------------------------------------------------------
# (1) the transcriptions against the papers' own arithmetic
# --------------------------------------------------------------------------------------------


def test_the_transcribed_tables_are_there():
    """PromptStyler: Table 2 (9 rows), C1-C4 and B1; DAPL: the authors' Office-Home, mini-DomainNet and
    VisDA-2017 rows (4 each); the other papers say why nothing is transcribed."""
    promptstyler = _load(REPO / "conf" / "papers" / "promptstyler.yaml")
    assert promptstyler["arxiv"] == "2307.15199"
    assert [t["table"] for t in promptstyler["tables"]] == ["2", "C1", "C2", "C3", "C4", "B1"]
    assert [len(t["rows"]) for t in promptstyler["tables"]] == [9, 9, 9, 9, 9, 3]
    dapl = _load(REPO / "conf" / "papers" / "dapl.yaml")
    assert [t["dataset"] for t in dapl["tables"]] == ["officehome", "mini_domainnet", "visda17"]
    assert [len(t["rows"]) for t in dapl["tables"]] == [4, 4, 4] and len(dapl["tables"][0]["columns"]) == 12
    for name in ("dapt", "domainfusion"):
        data = _load(REPO / "conf" / "papers" / f"{name}.yaml")
        assert data["tables"] == [] and data["not_transcribed"], name
    assert len(ROWS) == 48 + 12  # PromptStyler, DAPL


@pytest.mark.parametrize("item", ROWS, ids=_row_id)
def test_each_row_averages_to_the_papers_printed_average(item):
    _, table, row = item
    assert len(row["values"]) == len(table["columns"])
    assert average_error(table, row) <= rounding_bound(table.get("decimals", 1)) + 1e-9


def test_the_average_check_catches_a_swapped_digit():
    """The check above fails on a typo: PromptStyler Table 2, ZS-CLIP (C) RN50, 76.0 typed as 67.0."""
    table = {"columns": ["pacs", "vlcs", "officehome", "domainnet"], "decimals": 1}
    good = {"values": [90.6, 76.0, 68.6, 45.6], "average": 70.2}
    typo = {"values": [90.6, 67.0, 68.6, 45.6], "average": 70.2}
    assert average_error(table, good) <= rounding_bound(1)
    assert average_error(table, typo) > rounding_bound(1)  # (90.6 + 67.0 + 68.6 + 45.6) / 4 = 67.95


def test_the_per_dataset_values_are_the_per_domain_tables_averages():
    """PromptStyler prints each Table 2 value again as the Avg. of a per-domain table (C1-C4): both
    transcriptions must agree exactly, which catches a typo in either."""
    tables = _load(REPO / "conf" / "papers" / "promptstyler.yaml")["tables"]
    key = lambda r: (r["method"], r.get("variant") or "", r["backbone"])  # noqa: E731
    by_dataset = {
        t["dataset"]: {key(r): r["average"] for r in t["rows"]} for t in tables if t["columns_by"] == "domain"
    }
    checked = 0
    for t in tables:
        if t["columns_by"] != "dataset":
            continue
        for r in t["rows"]:
            for dataset, value in zip(t["columns"], r["values"]):
                assert by_dataset[dataset][key(r)] == value, (t["table"], r["paper_row"], r["backbone"], dataset)
                checked += 1
    assert checked == 36  # 9 rows x 4 datasets


# --------------------------------------------------------------------------------------------
# (2) every key in promptdg's vocabulary
# --------------------------------------------------------------------------------------------


def _conf(group: str) -> list:
    return [_load(p) for p in sorted((REPO / "conf" / group).glob("*.yaml"))]


METHOD_VARIANTS = {(m["name"], m.get("variant") or "") for m in _conf("method")}
DOMAINS = {d["name"]: d.get("domains") or [] for d in _conf("dataset")}
BACKBONES = {b["name"] for b in _conf("backbone")}


@pytest.mark.parametrize("item", ROWS, ids=_row_id)
def test_each_rows_keys_are_promptdgs(item):
    _, table, row = item
    assert (row["method"], row.get("variant") or "") in METHOD_VARIANTS
    assert row["backbone"] in BACKBONES
    assert table["metric"] in ("accuracy", "mean_per_class_accuracy")
    if table["columns_by"] == "dataset":
        assert set(table["columns"]) <= set(DOMAINS), table["columns"]
    else:
        for column in table["columns"]:  # a domain, or a pair "a+b→c" of the dataset's domains
            assert all(d in DOMAINS[table["dataset"]] for d in column.replace("→", "+").split("+")), column
    if row.get("shots") is not None:
        assert isinstance(row["shots"], int) and row["shots"] >= 1


def test_the_promptstyler_rows_name_the_runs_of_its_sweep():
    """Every (method, variant, backbone) of the paper rows is one the promptstyler_main sweep runs."""
    sweep = _load(REPO / "conf" / "experiment" / "promptstyler_main.yaml")["hydra"]["sweeper"]["params"]
    configs = {p.stem: _load(p) for p in (REPO / "conf" / "method").glob("*.yaml")}
    run = {(configs[m]["name"], configs[m].get("variant") or "", b)
           for m in sweep["method"].split(",") for b in sweep["backbone"].split(",")}
    rows = {(r["method"], r.get("variant") or "", r["backbone"]) for name, _, r in ROWS if name == "promptstyler.yaml"}
    assert rows == run


def _paper_file(tmp_path: Path, row: dict, **table) -> Path:
    spec = {"table": "9", "columns_by": "domain", "dataset": "pacs", "metric": "accuracy", "columns": PACS,
            "rows": [dict({"paper_row": "X", "method": "zeroshot", "variant": "[class]", "backbone": "rn50",
                           "values": [1.0, 2.0, 3.0, 4.0], "average": 2.5}, **row)]}
    spec.update(table)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"paper": "Mine", "short": "Mine", "arxiv": None, "tables": [spec]}))
    return path


@pytest.mark.parametrize("row, table, key, value, valid", [
    ({"method": "promptstyer"}, {}, "method", "promptstyer", "promptstyler"),
    ({"variant": "a photo of a [class]"}, {}, "variant", "a photo of a [class]", "a photo of a [class]."),
    ({"backbone": "vit_b14"}, {}, "backbone", "vit_b14", "vit_b16"),
    ({}, {"columns": ["art", "cartoon", "photo", "sketch"]}, "columns", "art", "art_painting"),
    ({}, {"dataset": "PACS"}, "dataset", "PACS", "pacs"),
    ({"values": [1.0, 2.0]}, {}, "values", "[1.0, 2.0]", "4 numbers"),
    ({"shots": 0}, {}, "shots", "0", "integer >= 1"),
    ({}, {"columns_by": "domains"}, "columns_by", "domains", "domain or dataset"),
])
def test_a_bad_paper_file_is_an_error_naming_the_key_the_value_and_the_valid_ones(
    tmp_path, capsys, row, table, key, value, valid
):
    path = _paper_file(tmp_path, row, **table)
    records = tmp_path / "runs"
    _write_records(records)
    assert main([str(records), "--paper-file", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{key}=" in err and value in err and valid in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# (3) collect --paper on records, against cells worked out by hand
# --------------------------------------------------------------------------------------------


def _record(method: str, seed: int, accuracy: dict, variant: str = "") -> dict:
    return {
        "status": "finished", "method": method, "variant": variant, "dataset": "pacs", "backbone": "rn50",
        "model": "RN50-quickgelu", "pretrained": "openai", "protocol": "dg", "seed": seed, "domains": PACS,
        "target_domains": list(accuracy), "source_domains": {d: [] for d in accuracy}, "accuracy": accuracy,
        "avg_accuracy": sum(accuracy.values()) / len(accuracy), "timings": {"total_s": 1.0},
        "peak_memory_mb": {"cpu_rss": 1.0, "cuda": None}, "config_hash": f"{method}{seed}", "run_dir": "",
        "source_free": method == "promptstyler",
    }


def _write_records(root: Path) -> None:
    """PACS, RN50 (the paper's Table C1 values in the comments):
    zeroshot "[class]" (88.9, 94.4, 99.3, 79.8; Avg 90.6), seeds 1-3:
        art_painting 88.5 / 89.0 / 89.5, cartoon 94.4, photo 99.0, sketch 80.0
    promptstyler (93.7, 94.7, 99.4, 84.9; Avg 93.2), seed 1 only: 93.7, 94.0, 99.4, 84.9
    linear_probe (not in the paper), seed 1: 50.0 everywhere
    """
    runs = [
        ("zeroshot", s, dict(zip(PACS, [a, 94.4, 99.0, 80.0])), "[class]") for s, a in ((1, 88.5), (2, 89.0), (3, 89.5))
    ]
    runs += [("promptstyler", 1, dict(zip(PACS, [93.7, 94.0, 99.4, 84.9])), ""),
             ("linear_probe", 1, dict(zip(PACS, [50.0] * 4)), "")]
    for method, seed, accuracy, variant in runs:
        run_dir = root / f"{method}_s{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(_record(method, seed, accuracy, variant)))


@pytest.fixture
def collected(tmp_path, capsys):
    _write_records(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "--paper", "-o", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    out = tmp_path / "out"
    return md, (out / "results.csv").read_text(), (out / "results.tex").read_text()


def _md_row(md: str, label: str) -> list:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_cells_show_the_paper_value_and_the_signed_delta(collected):
    md, _, _ = collected
    # art_painting: mean(88.5, 89.0, 89.5) = 89.0, sample std 0.5; 89.0 - 88.9 = +0.1
    # photo: 99.0 - 99.3 = -0.3; sketch: 80.0 - 79.8 = +0.2; cartoon: 94.4 - 94.4 = 0.0
    # Avg: per-seed means 90.475, 90.6, 90.725 -> 90.6 +- 0.125; 90.6 - 90.6 = 0.0
    assert _md_row(md, "zeroshot ([class])") == [
        "zeroshot ([class])", "rn50", "89.0 ± 0.5 (paper 88.9, +0.1)", "94.4 ± 0.0 (paper 94.4, 0.0)",
        "99.0 ± 0.0 (paper 99.3, −0.3)", "80.0 ± 0.0 (paper 79.8, +0.2)", "90.6 ± 0.1 (paper 90.6, 0.0)",
    ]
    # one seed, no std: cartoon 94.0 - 94.7 = -0.7; Avg (93.7 + 94.0 + 99.4 + 84.9) / 4 = 93.0, - 93.2 = -0.2
    row = _md_row(md, "promptstyler (1/3 seeds)")
    assert row[3] == "94.0 (paper 94.7, −0.7)" and row[6] == "93.0 (paper 93.2, −0.2)"
    assert not any("paper" in c for c in _md_row(md, "linear_probe (1/3 seeds)"))


def test_the_markdown_summary_counts_cells_within_the_seeds_spread(collected):
    md, _, _ = collected
    # zeroshot: art (|0.1| <= 0.5), cartoon (0 <= 0.05), Avg (0 <= 0.125) within;
    # photo (0.3 > 0.05), sketch (0.2 > 0.05) not
    assert ("- zeroshot ([class]) / rn50: 5 cell(s) with a paper value (PromptStyler Tab. C1), 5 measured, "
            "3 within the seeds' spread; largest |delta| 0.3 (photo)") in md
    # promptstyler, one seed (s = 0): art, photo, sketch exactly equal; cartoon (0.7) and Avg (0.2) not
    assert ("- promptstyler / rn50: 5 cell(s) with a paper value (PromptStyler Tab. C1), 5 measured, "
            "3 within the seeds' spread; largest |delta| 0.7 (cartoon)") in md
    assert "|delta| <= max(s, r)" in md and "linear_probe / rn50:" not in md


def test_csv_has_the_paper_columns_beside_the_numbers(collected):
    _, text, _ = collected
    rows = list(csv.DictReader(io.StringIO(text)))
    photo = next(r for r in rows if r["method"] == "zeroshot ([class])" and r["domain"] == "photo")
    assert (photo["mean"], photo["paper"], photo["paper_source"]) == ("99.0000", "99.3", "PromptStyler Tab. C1")
    assert float(photo["delta"]) == pytest.approx(-0.3) and photo["within_spread"] == "false"
    art = next(r for r in rows if r["method"] == "zeroshot ([class])" and r["domain"] == "art_painting")
    assert float(art["delta"]) == pytest.approx(0.1) and art["within_spread"] == "true"
    assert (art["row_paper_cells"], art["row_within"]) == ("5", "3")
    lp = next(r for r in rows if r["method"] == "linear_probe" and r["domain"] == "photo")
    assert (lp["paper"], lp["delta"], lp["row_paper_cells"]) == ("", "", "0")


def test_latex_cells_and_summary(collected):
    _, _, tex = collected
    assert r"99.0 $\pm$ 0.0 {\scriptsize (paper 99.3, $-$0.3)}" in tex
    assert r"89.0 $\pm$ 0.5 {\scriptsize (paper 88.9, +0.1)}" in tex
    assert "5 measured, 3 within the seeds' spread" in tex


def test_datasets_as_columns_match_table_2_and_leave_avg_alone(tmp_path, capsys):
    """--columns dataset: the pacs cell is Table 2's; Avg over the table's only column (pacs) is not
    the average Table 2 printed over four datasets, so it gets no paper value."""
    _write_records(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "--paper", "--columns", "dataset", "-o", str(tmp_path / "out")]) == 0
    row = _md_row(capsys.readouterr().out, "zeroshot ([class])")
    assert row[2] == "90.6 ± 0.1 (paper 90.6, 0.0)" and row[3] == "90.6 ± 0.1"


def test_without_paper_nothing_changes(tmp_path, capsys):
    _write_records(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "-o", str(tmp_path / "out")]) == 0
    assert "paper" not in capsys.readouterr().out.lower()
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert header == "dataset,protocol,metric,method,backbone,domain,mean,std,n_seeds"


def test_a_paper_file_of_ones_own_and_a_disagreement_between_papers(tmp_path, capsys):
    """--paper-file adds a file; where it disagrees with conf/papers, the first (conf/papers) is shown
    and a note names both."""
    _write_records(tmp_path / "runs")
    mine = _paper_file(tmp_path, {"values": [80.0, 94.4, 99.3, 79.8], "average": 88.4})
    assert main([str(tmp_path / "runs"), "--paper-file", str(mine), "-o", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    assert _md_row(md, "zeroshot ([class])")[2] == "89.0 ± 0.5 (paper 88.9, +0.1)"
    assert "art_painting: Mine Tab. 9 prints 80.0, shown: PromptStyler Tab. C1 88.9" in md


def test_records_with_no_paper_value_say_so(tmp_path, capsys):
    """tools/gen_records.py's few-shot records: DAPT's tables are not transcribed, so each table
    says that no cell has a paper value (and the command still succeeds)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_records", REPO / "tools" / "gen_records.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path / "runs", methods=("dapt",), datasets=("dtd",), shots=(16,), seeds=(1, 2),
                 zeroshot_backbones=(), n_failed=0, n_missing=0)
    assert main([str(tmp_path / "runs"), "--paper", "-o", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    assert "Paper values: no cell of this table has one in conf/papers." in md and "(paper " not in md


def test_within_means_the_larger_of_the_spread_and_the_rounding():
    """|delta| <= max(s, r): seeds 89.0 and 89.1 have s = sqrt(2 * 0.05**2 / 1) = 0.0707 (r = 0.05).
    A delta of 0.1 is outside max(s, r) = 0.0707 although inside s + r = 0.1207; one seed has s = 0."""
    from promptdg_cli.collect.paper import PaperCell
    from promptdg_cli.collect.tables import Cell

    two = Cell((89.0, 89.1), (1, 2))
    assert two.std == pytest.approx(0.0707, abs=1e-4)
    assert PaperCell(89.1, 1, "P").within(two) is True  # delta -0.05
    assert PaperCell(89.15, 1, "P").within(two) is False  # delta -0.10
    one = Cell((89.0,), (1,))
    assert PaperCell(89.04, 1, "P").within(one) is True  # 0.04 <= r = 0.05
    assert PaperCell(89.1, 1, "P").within(one) is False  # 0.1 > 0.05
    assert PaperCell(89.004, 2, "P").within(one) is True and PaperCell(89.01, 2, "P").within(one) is False  # r = 0.005
    assert PaperCell(89.0, 1, "P").within(Cell()) is None  # no result, no verdict
