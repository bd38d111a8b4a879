"""The tables of ``promptdg collect``: records -> rows (method label x backbone), columns (target
domains, UDA source→target pairs, or datasets) and cells (mean ± sample std over seeds, per-seed
averages), following the rules in the package docstring (``promptdg_cli/collect/__init__.py``).
Pure: no I/O, no rendering.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..record import OPT_INS, RunRecord
from .records import (
    METRICS,
    PAIR_ARROW,
    UDA,
    CollectError,
    as_mapping,
    backbone_label,
    column_label,
    domain_index,
    filter_records,
    method_label,
    pair_sources,
    split_pair,
)

ZERO_SHOT = "zeroshot"
COLUMN_MODES = ("domain", "dataset")  # --columns: target domains (default) or datasets
DATASETS_TITLE = "datasets"  # Table.dataset of a dataset-columns table
# Canonical column order of a dataset-columns table; other datasets follow alphabetically.
DATASET_ORDER = (
    "pacs", "vlcs", "officehome", "terra_incognita", "domainnet", "visda17", "mini_domainnet",
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "demo_digits",
)
METRIC_TITLES = {
    "accuracy": "top-1 accuracy (%)",
    "mean_per_class_accuracy": "mean per-class accuracy (%)",
}



@dataclass
class Cell:
    """One table cell: the per-seed values and their summary."""

    values: Tuple[float, ...] = ()  # one per seed, in `seeds` order
    seeds: Tuple[Any, ...] = ()
    paper: Any = None  # the paper's value of this cell (a paper.PaperCell), set by `collect --paper`

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (ddof=1); None below two seeds."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Row:
    label: str  # "method" or "method (variant)"
    method: str
    variant: str
    backbone: str
    cells: Dict[str, Cell]  # column (domain) -> cell; every table column is present
    avg: Cell  # per-seed averages over all columns, for seeds that have every column
    seeds: Tuple[Any, ...]  # every seed with at least one value in this row

    @property
    def max_seeds(self) -> int:
        """The row's reference seed count: the largest seed count of its domain cells."""
        return max((c.n for c in self.cells.values()), default=0)


@dataclass
class FailedRun:
    run_dir: str
    label: str
    backbone: str
    seed: Any
    targets: Tuple[str, ...]
    status: str
    error: str  # first non-empty line of the record's `error`
    superseded: bool  # a finished run of the same row and seed covers all its targets
    columns: Tuple[str, ...] = ()  # its targets as table columns (uda: source→target pairs)
    dataset: str = ""


@dataclass
class Table:
    dataset: str
    protocol: str
    metric: str  # "accuracy" or "mean_per_class_accuracy"
    # target domains (uda: source→target pairs) in canonical order, or datasets when
    # columns_kind == "dataset" ("Avg" is separate: Row.avg)
    columns: List[str]
    rows: List[Row]
    failed: List[FailedRun] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # e.g. duplicate measurements
    columns_kind: str = "domain"  # "domain" or "dataset" (then `dataset` is DATASETS_TITLE)
    paper_checked: bool = False  # `collect --paper` looked up its cells (paper.annotate)

    @property
    def title(self) -> str:
        return f"{self.dataset} ({self.protocol}) — {METRIC_TITLES.get(self.metric, self.metric)}"

    @property
    def max_seeds(self) -> int:
        return max((r.max_seeds for r in self.rows), default=0)

    def row(self, label: str, backbone: str) -> Row:
        for r in self.rows:
            if r.label == label and r.backbone == backbone:
                return r
        raise KeyError(f"no row ({label!r}, {backbone!r}) in {self.title}")

    def cell(self, label: str, backbone: str, column: str) -> Cell:
        """A cell by row and column; ``column="Avg"`` gives the average cell."""
        r = self.row(label, backbone)
        return r.avg if column == "Avg" else r.cells[column]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _seed_key(seed: Any) -> Tuple[int, Any]:
    if isinstance(seed, bool) or seed is None:
        return (2, str(seed))
    if isinstance(seed, (int, float)):
        return (0, seed)
    return (1, str(seed))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)


def _natural(text: str) -> List[Any]:
    """Sort key comparing digit runs as numbers: "dapt (2-shot)" before "dapt (16-shot)"."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text.lower()))]


def _row_order(key: Tuple[str, str, str]) -> Tuple[Any, ...]:
    label, backbone, method = key
    return (method != ZERO_SHOT, _natural(label), label, _natural(backbone), backbone)


def _first_line(text: Any) -> str:
    for line in str(text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


class _Group:
    def __init__(self) -> None:
        self.domains: List[str] = []
        # (label, backbone, method) -> {"variant": str, metric -> seed -> column -> value}
        self.rows: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
        self.pairs: Dict[str, Tuple[Tuple[str, ...], str]] = {}  # uda column -> (sources, target)
        self.failed: List[Mapping[str, Any]] = []
        self.duplicates: List[str] = []

    def add_domains(self, domains: Any) -> None:
        if isinstance(domains, (list, tuple)):
            for d in domains:
                if isinstance(d, str) and d not in self.domains:
                    self.domains.append(d)


def collect_tables(
    records: Iterable[RunRecord | Mapping[str, Any]],
    filters: Optional[Mapping[str, Sequence[str]]] = None,
    columns: str = "domain",
) -> List[Table]:
    """Turn records into tables (pure: no I/O).

    ``records`` are :class:`RunRecord` objects or results.json dictionaries; ``filters`` (optional) as from
    :func:`parse_filters`. When two finished records measure the same (row, seed, column), the
    later one wins (records from :func:`load_records` are ordered by file mtime, others by list
    position) and the table gets a note.

    ``columns="domain"`` (default): one table per (dataset, protocol), sorted; a dataset's
    mean-per-class table directly follows its accuracy table. ``columns="dataset"``: one table per
    (protocol, metric) with the datasets as columns (see the package docstring).
    """
    if columns not in COLUMN_MODES:
        raise CollectError(f"unknown column layout {columns!r}; valid: {', '.join(COLUMN_MODES)}")
    mapped: Sequence[Mapping[str, Any]] = [as_mapping(r) for r in records]
    if filters:
        mapped = filter_records(mapped, filters)
    order = sorted(range(len(mapped)), key=lambda i: (float(mapped[i].get("_mtime") or 0.0), i))

    groups: Dict[Tuple[str, str], _Group] = {}
    for i in order:
        rec = mapped[i]
        key = (str(rec.get("dataset") or "?"), str(rec.get("protocol") or "dg"))
        group = groups.setdefault(key, _Group())
        group.add_domains(rec.get("domains"))
        if rec.get("status", "finished") != "finished":
            group.failed.append(rec)
            continue
        method = str(rec.get("method") or "?")
        row_key = (method_label(rec), backbone_label(rec), method)
        row = group.rows.setdefault(row_key, {"variant": str(rec.get("variant") or "")})
        seed = _hashable(rec.get("seed"))
        for metric in METRICS:
            values = rec.get(metric)
            if not isinstance(values, dict):
                continue
            per_seed = row.setdefault(metric, {}).setdefault(seed, {})
            for domain, value in values.items():
                if not _is_number(value):
                    continue
                col = column_label(rec, domain)
                if col != domain:
                    group.pairs[col] = (pair_sources(rec, domain), domain)
                elif PAIR_ARROW in col:
                    group.pairs[col] = split_pair(col)
                if metric == "accuracy" and col in per_seed:
                    group.duplicates.append(
                        f"{row_key[0]} / {row_key[1]} / seed {seed} / {col}: "
                        f"kept {rec.get('_path') or rec.get('run_dir') or 'a later record'}"
                    )
                per_seed[col] = float(value)

    if columns == "dataset":
        return [_with_legend(t) for t in _dataset_tables(groups)]
    tables: List[Table] = []
    for (dataset, protocol), group in sorted(groups.items()):
        for metric in METRICS:
            if metric != "accuracy" and not any(r.get(metric) for r in group.rows.values()):
                continue
            table = _build_table(dataset, protocol, metric, group)
            if metric == "accuracy":
                table.failed = _failed_runs(group, dataset)
                if group.duplicates:
                    table.notes.append(_duplicates_note(group.duplicates))
            tables.append(_with_legend(table))
    return tables


def _with_legend(table: Table) -> Table:
    """A note for each opt-in (OPT_INS) that marks a row: what the row's runs did instead of the official protocol."""
    for opt_in, (mark, meaning) in OPT_INS.items():
        if any(f"{opt_in}{mark}" in r.label for r in table.rows):
            table.notes.append(f"{opt_in}{mark}: {meaning}")
    return table


def _duplicates_note(duplicates: Sequence[str]) -> str:
    return (
        f"{len(duplicates)} duplicate measurement(s) of the same row, seed and domain; the newest "
        f"record was kept: " + "; ".join(duplicates[:5]) + (" …" if len(duplicates) > 5 else "")
    )


def _group_columns(protocol: str, metric: str, group: _Group) -> List[str]:
    """The columns a (dataset, protocol) group has for ``metric``, in canonical order."""
    present = {d for r in group.rows.values() for per in r.get(metric, {}).values() for d in per}
    if protocol != UDA:
        return [d for d in group.domains if d in present] + sorted(present.difference(group.domains))

    def pair_order(col: str) -> Tuple[Any, ...]:
        sources, target = group.pairs.get(col, ((), col))
        return (
            len(sources) > 1,  # bare targets (no sources known) and single-source pairs first
            tuple(domain_index(group.domains, d) for d in sources),
            domain_index(group.domains, target),
            col,
        )

    return sorted(present, key=pair_order)


def _make_rows(
    entries: Mapping[Tuple[str, str, str], Tuple[str, Mapping[Any, Mapping[str, float]]]],
    columns: Sequence[str],
) -> List[Row]:
    """Rows from ``(label, backbone, method) -> (variant, seed -> column -> value)``."""
    rows: List[Row] = []
    for key in sorted(entries, key=_row_order):
        variant, data = entries[key]
        seeds = sorted((s for s, per in data.items() if per), key=_seed_key)
        cells = {}
        for col in columns:
            have = [s for s in seeds if col in data[s]]
            cells[col] = Cell(tuple(data[s][col] for s in have), tuple(have))
        complete = [s for s in seeds if all(col in data[s] for col in columns)]
        avg = Cell(
            tuple(statistics.fmean(data[s][c] for c in columns) for s in complete) if columns else (),
            tuple(complete) if columns else (),
        )
        label, backbone, method = key
        rows.append(Row(label, method, variant, backbone, cells, avg, tuple(seeds)))
    return rows


def _build_table(dataset: str, protocol: str, metric: str, group: _Group) -> Table:
    columns = _group_columns(protocol, metric, group)
    entries = {
        key: (r["variant"], r.get(metric) or {})
        for key, r in group.rows.items()
        if any((r.get(metric) or {}).values())
    }
    return Table(dataset, protocol, metric, columns, _make_rows(entries, columns))


def _dataset_order(name: str) -> Tuple[int, str]:
    return (DATASET_ORDER.index(name), "") if name in DATASET_ORDER else (len(DATASET_ORDER), name)


def _dataset_tables(groups: Mapping[Tuple[str, str], _Group]) -> List[Table]:
    """One table per (protocol, metric) with the datasets as columns."""
    by_protocol: Dict[str, Dict[str, _Group]] = {}
    for (dataset, protocol), group in groups.items():
        by_protocol.setdefault(protocol, {})[dataset] = group
    tables: List[Table] = []
    for protocol in sorted(by_protocol):
        datasets = by_protocol[protocol]
        for metric in METRICS:
            if metric != "accuracy" and not any(
                r.get(metric) for g in datasets.values() for r in g.rows.values()
            ):
                continue
            # each dataset's domain set: the columns of its domain table for this metric
            domain_sets = {ds: _group_columns(protocol, metric, g) for ds, g in datasets.items()}
            columns = sorted((ds for ds, cols in domain_sets.items() if cols), key=_dataset_order)
            entries: Dict[Tuple[str, str, str], Tuple[str, Dict[Any, Dict[str, float]]]] = {}
            incomplete: List[str] = []
            for ds in columns:
                wanted = domain_sets[ds]
                for key, r in datasets[ds].rows.items():
                    per_seed = r.get(metric) or {}
                    if not any(per_seed.values()):
                        continue
                    _, data = entries.setdefault(key, (r["variant"], {}))
                    for seed, per in per_seed.items():
                        if not per:
                            continue
                        row_data = data.setdefault(seed, {})
                        lacking = [d for d in wanted if d not in per]
                        if lacking:
                            incomplete.append(
                                f"{key[0]} / {key[1]} / seed {seed} / {ds}: lacks {', '.join(lacking)}"
                            )
                        else:
                            row_data[ds] = statistics.fmean(per[d] for d in wanted)
            table = Table(DATASETS_TITLE, protocol, metric, columns, _make_rows(entries, columns),
                          columns_kind="dataset")
            if incomplete:
                table.notes.append(
                    f"{len(incomplete)} seed(s) tested only part of a dataset's domains and are not "
                    f"averaged for it: " + "; ".join(incomplete[:5]) + (" …" if len(incomplete) > 5 else "")
                )
            if metric == "accuracy":
                for ds in sorted(datasets, key=_dataset_order):
                    group = datasets[ds]
                    table.failed.extend(_failed_runs(group, ds))
                    if group.duplicates:
                        table.notes.append(f"{ds}: " + _duplicates_note(group.duplicates))
            tables.append(table)
    return tables


def _failed_runs(group: _Group, dataset: str = "") -> List[FailedRun]:
    out = []
    for rec in group.failed:
        label, backbone = method_label(rec), backbone_label(rec)
        seed = _hashable(rec.get("seed"))
        targets = tuple(str(t) for t in rec.get("target_domains") or ())
        columns = tuple(column_label(rec, t) for t in targets)
        done = group.rows.get((label, backbone, str(rec.get("method") or "?")), {}).get("accuracy", {}).get(seed, {})
        out.append(
            FailedRun(
                run_dir=str(rec.get("run_dir") or (os.path.dirname(rec["_path"]) if rec.get("_path") else "?")),
                label=label,
                backbone=backbone,
                seed=seed,
                targets=targets,
                status=str(rec.get("status")),
                error=_first_line(rec.get("error")) or "(no error text)",
                superseded=bool(columns) and all(c in done for c in columns),
                columns=columns,
                dataset=dataset,
            )
        )
    return out
