"""The papers' numbers beside promptdg's: what ``promptdg collect --paper`` adds to the tables.

Matching: a collect table meets a paper table (:mod:`.paper`) of the same metric and column kind
(and, for domain columns, the same dataset); a collect row meets a paper row with the same method
label (:func:`~promptdg_cli.collect.records.method_label` of method, variant and shots) and backbone;
a cell meets the paper value of the same column (domain, ``source→target`` pair, or dataset).
``Avg`` gets the paper's average only when the collect table's columns are exactly those the paper
averaged over (``average_over``, default: all of the paper table's columns). The first paper file
(alphabetical) and table that give a cell a value win; a different value elsewhere is named in a
table note.

A cell with a paper value reads ``84.1 ± 0.3 (paper 84.4, −0.3)``: the delta is promptdg's mean
minus the paper's value, rounded like the paper's value (at least one decimal). The cell is
*within the seeds' spread* when ``|delta| <= max(s, r)``, ``s`` the cell's sample standard deviation
over seeds (0 for a single seed) and ``r`` half a unit of the paper's last printed decimal (0.05 for
one decimal: the paper value's own rounding). After each table, one summary line per row counts its
cells (``Avg`` included) with a paper value, those promptdg measured and those within the spread,
and names the largest ``|delta|``. CSV gets :data:`CSV_FIELDS` as extra columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .paper import PaperCell, PaperTable
from .tables import Cell, Row, Table

WITHIN_RULE = (
    "within the seeds' spread: |delta| <= max(s, r), s = the cell's sample std over seeds (0 for one seed), "
    "r = half a unit of the paper's last printed decimal (its rounding)"
)
MINUS = "\u2212"


def _candidates(table: Table, papers: Sequence[PaperTable]) -> List[PaperTable]:
    return [
        p for p in papers
        if p.metric == table.metric and p.columns_by == table.columns_kind
        and (p.columns_by == "dataset" or p.dataset == table.dataset)
    ]


def _assign(cell: Cell, value: PaperCell, where: str, conflicts: List[str]) -> None:
    if cell.paper is None:
        cell.paper = value
    elif abs(cell.paper.value - value.value) > 1e-9:
        conflicts.append(f"{where}: {value.source} prints {value.value:.{value.decimals}f}, "
                         f"shown: {cell.paper.source} {cell.paper.value:.{cell.paper.decimals}f}")


def annotate(tables: Sequence[Table], papers: Sequence[PaperTable]) -> None:
    """Give every cell of ``tables`` that a paper reports its :class:`PaperCell` (``Cell.paper``) and
    mark the tables as checked (``Table.paper_checked``), in place."""
    for table in tables:
        table.paper_checked = True
        conflicts: List[str] = []
        candidates = _candidates(table, papers)
        for row in table.rows:
            for paper in candidates:
                for prow in paper.rows:
                    if prow.label != row.label or prow.backbone != row.backbone:
                        continue
                    for column in table.columns:
                        if column in prow.values:
                            value = PaperCell(prow.values[column], paper.decimals, paper.source)
                            _assign(row.cells[column], value, f"{row.label} / {row.backbone} / {column}", conflicts)
                    if prow.average is not None and set(table.columns) == set(paper.average_over):
                        value = PaperCell(prow.average, paper.decimals, paper.source)
                        _assign(row.avg, value, f"{row.label} / {row.backbone} / Avg", conflicts)
        if conflicts:
            table.notes.append("papers differ on a cell (the first is shown): " + "; ".join(conflicts))


# What the renderers print: the cell's suffix, the summary after a table, the CSV fields


def _signed(value: float, decimals: int, minus: str) -> str:
    """``+0.4``, ``−0.3`` (``minus`` as the sign), ``0.0`` when it rounds to zero."""
    text = f"{value:+.{decimals}f}"
    if float(text) == 0.0:
        return text[1:]
    return minus + text[1:] if text.startswith("-") else text


def cell_suffix(cell: Cell, style: str = "md") -> str:
    """`` (paper 84.4, −0.3)`` for a cell with a paper value (``(paper 84.4)`` when the cell has no
    result), ``""`` otherwise; ``style="tex"`` writes LaTeX."""
    paper: Optional[PaperCell] = cell.paper
    if paper is None:
        return ""
    shown = f"{paper.value:.{paper.decimals}f}"
    delta = paper.delta(cell)
    if style == "tex":
        text = shown if delta is None else f"{shown}, {_signed(delta, max(paper.decimals, 1), '$-$')}"
        return rf" {{\scriptsize (paper {text})}}"
    text = shown if delta is None else f"{shown}, {_signed(delta, max(paper.decimals, 1), MINUS)}"
    return f" (paper {text})"


@dataclass(frozen=True)
class RowSummary:
    label: str
    backbone: str
    paper_values: int  # cells (incl. Avg) with a paper value
    measured: int  # ... of which promptdg has a result
    within: int  # ... of which within the seeds' spread
    largest: Optional[Tuple[str, float]]  # (column, delta) of the largest |delta|
    sources: Tuple[str, ...]


def _row_cells(table: Table, row: Row) -> List[Tuple[str, Cell]]:
    return [(c, row.cells[c]) for c in table.columns] + [("Avg", row.avg)]


def row_summary(table: Table, row: Row) -> RowSummary:
    with_paper = [(c, cell) for c, cell in _row_cells(table, row) if cell.paper is not None]
    measured = [(c, cell) for c, cell in with_paper if cell.n]
    deltas = [(c, cell.paper.delta(cell)) for c, cell in measured]
    largest = max(deltas, key=lambda cd: abs(cd[1])) if deltas else None
    sources = tuple(dict.fromkeys(cell.paper.source for _, cell in with_paper))
    return RowSummary(row.label, row.backbone, len(with_paper), len(measured),
                      sum(bool(cell.paper.within(cell)) for _, cell in measured), largest, sources)


def summary_lines(table: Table) -> List[str]:
    """Plain-text lines, one per row with a paper value, for the summary after a table."""
    if not table.paper_checked:
        return []
    lines = []
    for row in table.rows:
        s = row_summary(table, row)
        if not s.paper_values:
            continue
        text = (f"{s.label} / {s.backbone}: {s.paper_values} cell(s) with a paper value ({', '.join(s.sources)}), "
                f"{s.measured} measured, {s.within} within the seeds' spread")
        if s.largest is not None:
            text += f"; largest |delta| {abs(s.largest[1]):.1f} ({s.largest[0]})"
        lines.append(text)
    return lines


def markdown_summary(table: Table) -> List[str]:
    """The markdown block after a table: the rule, then a line per row."""
    if not table.paper_checked:
        return []
    lines = summary_lines(table)
    if not lines:
        return ["", "Paper values: no cell of this table has one in conf/papers."]
    return ["", f"Paper values (cells incl. Avg; {WITHIN_RULE}):", ""] + [f"- {line}" for line in lines]


def latex_summary(table: Table, escape: Callable[[str], str]) -> List[str]:
    """The same after a LaTeX tabular (``escape``: the renderer's text escaping)."""
    lines = summary_lines(table)
    if not lines:
        return []
    body = r" \\ ".join(escape(line) for line in lines)
    return [r"\par\smallskip{\footnotesize " + escape(f"Paper values ({WITHIN_RULE}):") + r" \\ " + body + "}"]


CSV_FIELDS = ("paper", "paper_source", "delta", "within_spread", "row_paper_cells", "row_within")


def csv_fields(table: Table, row: Row, cell: Cell) -> List[Any]:
    """The extra CSV fields of one line (:data:`CSV_FIELDS`); empty strings where there is no paper value."""
    s = row_summary(table, row)
    paper: Optional[PaperCell] = cell.paper
    if paper is None:
        return ["", "", "", "", s.paper_values, s.within]
    delta = paper.delta(cell)
    within = paper.within(cell)
    return [f"{paper.value:.{paper.decimals}f}", paper.source, "" if delta is None else f"{delta:.4f}",
            "" if within is None else str(within).lower(), s.paper_values, s.within]
