"""Rendering ``promptdg collect``'s tables as text: markdown (printed and ``results.md``), CSV and
LaTeX (booktabs)."""
from __future__ import annotations

import csv
import io
from typing import List, Sequence

from . import paper_view
from .records import UDA
from .tables import METRIC_TITLES, Cell, Row, Table

MISSING = "–"  # en dash: a cell with no result


def format_cell(cell: Cell, ref_seeds: int, pm: str = "±", missing: str = MISSING) -> str:
    """``63.0 ± 3.0``; ``65.0`` for one seed; ``(k/n seeds)`` when below ``ref_seeds``; ``(paper 63.4,
    −0.4)`` after a cell with a paper value (``collect --paper``)."""
    if cell.n == 0:
        return missing + paper_view.cell_suffix(cell)
    text = f"{cell.mean:.1f}"
    if cell.std is not None:
        text += f" {pm} {cell.std:.1f}"
    if cell.n < ref_seeds:
        text += f" ({cell.n}/{ref_seeds} seeds)"
    return text + paper_view.cell_suffix(cell)


def _row_label(table: Table, row: Row) -> str:
    if row.max_seeds < table.max_seeds:
        return f"{row.label} ({row.max_seeds}/{table.max_seeds} seeds)"
    return row.label


def caption(table: Table) -> str:
    metric = METRIC_TITLES.get(table.metric, table.metric).capitalize()
    by_dataset = table.columns_kind == "dataset"
    if not table.rows:
        where = "per dataset" if by_dataset else f"on {table.dataset}"
        return f"{metric} {where} ({table.protocol} protocol): no finished runs."
    n = table.max_seeds
    seeds = f"{n} seed{'s' if n != 1 else ''}" if n else "no seeds"
    k = len(table.columns)
    if by_dataset:
        what = (
            f"{metric} per dataset ({table.protocol} protocol), up to {seeds} per row. A seed's value "
            f"on a dataset is its mean over all of the dataset's tested "
            f"{'source→target pairs' if table.protocol == UDA else 'target domains'}, only for seeds "
            f"that have every one of them."
        )
        kind = "dataset"
    else:
        unit = "source→target pair" if table.protocol == UDA else "target domain"
        what = f"{metric} per {unit} on {table.dataset} ({table.protocol} protocol), up to {seeds} per row."
        kind = "pair" if table.protocol == UDA else "domain"
    return (
        f"{what} Cells: mean ± sample standard deviation (ddof=1) over seeds, one decimal; a single "
        f"seed shows the mean only. Avg: mean ± std over seeds of the per-seed average of all {k} "
        f"{kind} column{'s' if k != 1 else ''}, counting only seeds that have every column. (k/n "
        f"seeds): a cell with k of its row's n seeds (on a method label: k of the table's n). "
        f"{MISSING}: no result."
    )


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(tables: Sequence[Table], heading_level: int = 3) -> str:
    out: List[str] = []
    hashes = "#" * heading_level
    for table in tables:
        out.append(f"{hashes} {_md_escape(table.title)}")
        out.append("")
        out.append(caption(table))
        out.append("")
        if table.rows:
            header = ["Method", "Backbone"] + table.columns + ["Avg"]
            out.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            out.append("|" + "|".join([":---", ":---"] + ["---:"] * (len(table.columns) + 1)) + "|")
            for row in table.rows:
                ref = row.max_seeds
                cells = [format_cell(row.cells[c], ref) for c in table.columns] + [format_cell(row.avg, ref)]
                out.append(
                    "| " + " | ".join(_md_escape(x) for x in [_row_label(table, row), row.backbone] + cells) + " |"
                )
        else:
            out.append("_No finished runs._")
        out.extend(paper_view.markdown_summary(table))
        if table.failed:
            out.append("")
            out.append(f"Failed runs: {len(table.failed)} (not averaged)")
            out.append("")
            for f in table.failed:
                targets = ",".join(f.columns or f.targets) or "?"
                if table.columns_kind == "dataset":
                    targets = f"{f.dataset or '?'} / {targets}"
                extra = " [later run of the same seed and targets finished]" if f.superseded else ""
                status = "" if f.status == "failed" else f" [status: {f.status}]"
                out.append(
                    f"- `{f.run_dir}` — {_md_escape(f.label)} / {f.backbone} / seed {f.seed} / "
                    f"{_md_escape(targets)}{status}: {_md_escape(f.error)}{extra}"
                )
        for note in table.notes:
            out.append("")
            out.append(f"Note: {_md_escape(note)}")
        out.append("")
    return "\n".join(out)


CSV_FIELDS = ("dataset", "protocol", "metric", "method", "backbone", "domain", "mean", "std", "n_seeds")
# header when every table has datasets as columns (`dataset` then holds the column, incl. "Avg")
DATASET_CSV_FIELDS = ("protocol", "metric", "method", "backbone", "dataset", "mean", "std", "n_seeds")


def render_csv(tables: Sequence[Table]) -> str:
    """One line per (dataset, protocol, metric, method label, backbone, column incl. ``Avg``).

    Domain tables: header :data:`CSV_FIELDS`, ``domain`` = the column (uda: the pair). When every
    table has datasets as columns: header :data:`DATASET_CSV_FIELDS`, ``dataset`` = the column
    (``Avg`` for the average over datasets). (A dataset table in a mixed list is written with the
    domain header: ``dataset`` = its column, ``domain`` = ``Avg``.) ``std`` is empty below two
    seeds; ``mean`` and ``std`` are empty when the cell is missing (``n_seeds`` 0).
    """
    by_dataset = bool(tables) and all(t.columns_kind == "dataset" for t in tables)
    with_paper = any(t.paper_checked for t in tables)  # collect --paper: paper_view.CSV_FIELDS follow
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        list(DATASET_CSV_FIELDS if by_dataset else CSV_FIELDS) + (list(paper_view.CSV_FIELDS) if with_paper else [])
    )
    for table in tables:
        for row in table.rows:
            for column, cell in [(c, row.cells[c]) for c in table.columns] + [("Avg", row.avg)]:
                stats = [
                    "" if cell.mean is None else f"{cell.mean:.4f}",
                    "" if cell.std is None else f"{cell.std:.4f}",
                    cell.n,
                ]
                head = [table.protocol, table.metric, row.label, row.backbone]
                stats += paper_view.csv_fields(table, row, cell) if with_paper else []
                if by_dataset:
                    writer.writerow(head + [column] + stats)
                elif table.columns_kind == "dataset":
                    writer.writerow([column] + head + ["Avg"] + stats)
                else:
                    writer.writerow([table.dataset] + head + [column] + stats)
    return buf.getvalue()


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def _tex(text: str) -> str:
    escaped = "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)
    return "{}" + escaped if escaped.startswith("[") else escaped  # `\\ [` would be an optional arg


def _tex_cell(cell: Cell, ref_seeds: int) -> str:
    if cell.n == 0:
        return "--" + paper_view.cell_suffix(cell, "tex")
    text = f"{cell.mean:.1f}"
    if cell.std is not None:
        text += rf" $\pm$ {cell.std:.1f}"
    if cell.n < ref_seeds:
        text += rf" {{\scriptsize ({cell.n}/{ref_seeds} seeds)}}"
    return text + paper_view.cell_suffix(cell, "tex")


def render_latex(tables: Sequence[Table]) -> str:
    out = ["% Generated by `promptdg collect`. Needs \\usepackage{booktabs}.", ""]
    for table in tables:
        out.append(r"\begin{table}[t]")
        out.append(r"\centering")
        out.append(r"\caption{" + _tex(caption(table)).replace("–", "--").replace("±", r"$\pm$") + "}")
        if table.rows:
            out.append(r"\begin{tabular}{ll" + "c" * (len(table.columns) + 1) + "}")
            out.append(r"\toprule")
            out.append(" & ".join(["Method", "Backbone"] + [_tex(c) for c in table.columns] + ["Avg"]) + r" \\")
            out.append(r"\midrule")
            for row in table.rows:
                ref = row.max_seeds
                cells = [_tex_cell(row.cells[c], ref) for c in table.columns] + [_tex_cell(row.avg, ref)]
                out.append(" & ".join([_tex(_row_label(table, row)), _tex(row.backbone)] + cells) + r" \\")
            out.append(r"\bottomrule")
            out.append(r"\end{tabular}")
            out.extend(paper_view.latex_summary(table, _tex))
        out.append(r"\end{table}")
        for f in table.failed:
            out.append(f"% failed: {f.run_dir}: {f.error}".replace("\n", " "))
        out.append("")
    return "\n".join(out)
