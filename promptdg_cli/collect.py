"""``promptdg collect``: gather every ``results.json`` below a directory into paper-style tables.

Only JSON is read (never logs, never checkpoints), and nothing heavy is imported at module level
(no torch / torchvision / open_clip; matplotlib only when the plot is drawn), so collecting a few
hundred runs takes well under a second plus the plot.

Layout of the output, one table per (dataset, protocol):

* rows: method label (``method`` or ``method (variant)``) x backbone; zero-shot rows first, then
  the other labels alphabetically (numbers as numbers: ``dapt (2-shot)`` before ``dapt (16-shot)``),
  backbone second;
* columns: the target domains some record has, in the dataset's canonical order (the record's
  ``domains`` list), then ``Avg``;
* cell: mean +- sample std (ddof=1) over seeds, one decimal (mean only for a single seed). Records
  of the same (method label, backbone, seed) that tested different targets merge into one row;
* Avg: per seed, the mean over all the table's columns (only seeds that have every column); the
  cell is mean +- std of those per-seed averages;
* ``(k/n seeds)`` marks a cell with fewer seeds than its row's maximum (on a row label: fewer than
  the table's maximum); ``–`` marks a missing cell;
* failed runs are counted and listed under their table, never averaged.

A second table of ``mean_per_class_accuracy`` follows when any record of the table has one.

UDA pair columns: in a table whose protocol is ``"uda"`` a tested target's column is the pair
``"<sources joined by '+'>→<target>"`` (sources from the record's ``source_domains[target]``, put
in the dataset's ``domains`` order), e.g. ``art→clipart`` or ``art+product→clipart``, so Office-Home's
12 pairs are 12 columns before Avg. Pair columns are ordered by source (``domains`` order,
single-source before multi-source), then by target (``domains`` order). A uda record without
``source_domains`` for a target gets the bare target name as column (these come first). The
``domain=`` filter still selects target domains.

Datasets as columns (``--columns dataset``; ``collect_tables(..., columns="dataset")``): one table
per (protocol, metric) titled ``datasets (<protocol>) — <metric>``, same rows, one column per
dataset (:data:`DATASET_ORDER` first, the rest alphabetically), then ``Avg``. A dataset's domain
set is the union of the columns (target domains, or pairs for uda) that any finished record of that
dataset has for the metric, i.e. the columns of its domain table. For each (row, seed), the seed's
records are merged first; the seed's dataset value is the mean over that domain set, and only a
seed that has every one of those domains contributes (an incomplete seed counts as a missing seed
and is named in a note, never averaged over fewer domains). So each dataset cell equals that
dataset's Avg in the domain layout. Cells, ``Avg`` (per seed over all dataset columns, only seeds
having every column), ``(k/n seeds)`` and ``–`` marks and the failed-run list follow the rules above.

Python API: :func:`load_records`, :func:`parse_filters`, :func:`filter_records`,
:func:`collect_tables` (pure; returns :class:`Table` objects; ``columns="domain" | "dataset"``),
:func:`column_label` (a record's column for a target: the domain, or the uda pair), the
``render_*`` / ``write_*`` functions, and :func:`main`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

RESULTS_NAME = "results.json"
OUTPUT_NAMES = ("results.md", "results.csv", "results.tex", "results.png")
ZERO_SHOT = "zeroshot"
MISSING = "–"  # en dash: a cell with no result
METRICS = ("accuracy", "mean_per_class_accuracy")
UDA = "uda"  # the protocol whose columns are source→target pairs
PAIR_ARROW = "→"
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

# Record fields a `key=value` filter may name; `label` is the table's method label and `domain`
# keeps only those target domains (columns).
FILTER_KEYS = (
    "method",
    "variant",
    "label",
    "backbone",
    "dataset",
    "protocol",
    "seed",
    "status",
    "domain",
    "model",
    "pretrained",
    "version",
    "git_revision",
    "config_hash",
)


class CollectError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class Loaded(NamedTuple):
    records: List[Dict[str, Any]]  # each with "_path" (the results.json) and "_mtime" added
    skipped: List[Tuple[str, str]]  # (path, reason) of unreadable or invalid files


def find_results(root: os.PathLike | str) -> List[Path]:
    """Every ``results.json`` below ``root`` (recursively, sorted, symlinked dirs not followed)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if RESULTS_NAME in files:
            found.append(Path(folder) / RESULTS_NAME)
    return found


def _validate(record: Any) -> Optional[str]:
    """Why ``record`` cannot be used, or None."""
    if not isinstance(record, dict):
        return f"top level is {type(record).__name__}, not an object"
    status = record.get("status", "finished")
    if status == "finished":
        for key in ("dataset", "method"):
            if not isinstance(record.get(key), str) or not record.get(key):
                return f"missing or empty '{key}'"
        acc = record.get("accuracy")
        if not isinstance(acc, dict) or not acc:
            return "finished run without an 'accuracy' object"
        for domain, value in acc.items():
            if not _is_number(value):
                return f"accuracy of {domain!r} is not a number: {value!r}"
    return None


def load_records(root: os.PathLike | str) -> Loaded:
    """Read every ``results.json`` below ``root``.

    Returns ``(records, skipped)``: the parsed records (each with ``_path`` and ``_mtime`` added;
    later files win when two runs measured the same row, seed and domain) and ``(path, reason)``
    for files that could not be read, were not valid JSON, or lack the fields a table needs.
    """
    records: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = []
    for path in find_results(root):
        try:
            with open(path, "r", encoding="utf-8") as fh:
                record = json.load(fh)
            mtime = path.stat().st_mtime
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append((str(path), f"unreadable: {exc}"))
            continue
        except json.JSONDecodeError as exc:
            skipped.append((str(path), f"invalid JSON: {exc}"))
            continue
        problem = _validate(record)
        if problem:
            skipped.append((str(path), problem))
            continue
        record["_path"] = str(path)
        record["_mtime"] = mtime
        records.append(record)
    return Loaded(records, skipped)


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def parse_filters(args: Sequence[str]) -> Dict[str, List[str]]:
    """``["method=coop,dapl", "seed=1"]`` -> ``{"method": ["coop", "dapl"], "seed": ["1"]}``.

    Repeating a key adds values. Raises :class:`CollectError` for a malformed argument or a key
    not in :data:`FILTER_KEYS` (the message names the valid keys).
    """
    filters: Dict[str, List[str]] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CollectError(f"filter {arg!r} is not key=value (valid keys: {', '.join(FILTER_KEYS)})")
        if key not in FILTER_KEYS:
            raise CollectError(f"unknown filter key {key!r}; valid keys: {', '.join(FILTER_KEYS)}")
        filters.setdefault(key, []).extend(v.strip() for v in value.split(","))
    return filters


def method_label(record: Mapping[str, Any]) -> str:
    """``method``, ``method (variant)``, and the shot count when the run drew k shots per class:
    ``dapt (16-shot)`` (one row per method and shot count, the few-shot tables' shape)."""
    method = str(record.get("method") or "?")
    parts = [str(record["variant"])] if record.get("variant") else []
    if record.get("shots"):
        parts.append(f"{record['shots']}-shot")
    return f"{method} ({', '.join(parts)})" if parts else method


def _backbone(record: Mapping[str, Any]) -> str:
    return str(record.get("backbone") or record.get("model") or "?")


def _domain_index(domains: Sequence[str], domain: str) -> Tuple[int, str]:
    """Sort key of a domain: its position in ``domains``, unknown ones after (alphabetically)."""
    return (domains.index(domain), "") if domain in domains else (len(domains), domain)


def _pair_sources(record: Mapping[str, Any], target: str) -> Tuple[str, ...]:
    """A uda record's source domains for ``target`` in the record's ``domains`` order (or ())."""
    sources = record.get("source_domains")
    sources = sources.get(target) if isinstance(sources, dict) else None
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, (list, tuple)):
        return ()
    domains = [d for d in record.get("domains") or () if isinstance(d, str)]
    unique = list(dict.fromkeys(str(d) for d in sources if d is not None and str(d)))
    return tuple(sorted(unique, key=lambda d: _domain_index(domains, d)))


def split_pair(key: str) -> Tuple[Tuple[str, ...], str]:
    """``"art+product→clipart"`` -> ``(("art", "product"), "clipart")``; a bare domain -> ``((), key)``."""
    if PAIR_ARROW not in key:
        return (), key
    sources, _, target = key.rpartition(PAIR_ARROW)
    return tuple(s for s in sources.split("+") if s), target


def column_label(record: Mapping[str, Any], target: str) -> str:
    """The table column of ``record``'s result on ``target``.

    The target itself, except for ``protocol == "uda"`` records: ``"<sources>→<target>"`` with the
    sources of ``source_domains[target]`` joined by ``+`` in the dataset's ``domains`` order (the
    bare target when the record does not name them).
    """
    if str(record.get("protocol") or "dg") != UDA or PAIR_ARROW in target:
        return target  # a record keyed by pair ("art→clipart", several pairs per run) names its column
    sources = _pair_sources(record, target)
    return "+".join(sources) + PAIR_ARROW + target if sources else target


def _field_text(record: Mapping[str, Any], key: str) -> str:
    if key == "label":
        return method_label(record)
    if key == "backbone":
        return _backbone(record)
    value = record.get(key)
    if key == "status" and value is None:
        value = "finished"
    return "" if value is None else str(value)


def filter_records(records: Iterable[Mapping[str, Any]], filters: Mapping[str, Sequence[str]]) -> List[Dict[str, Any]]:
    """Keep records whose field equals one of the given values (compared as text).

    ``domain`` keeps only those target domains: a finished record's accuracy dictionaries are
    restricted (the record is dropped when nothing is left); a failed record is kept when it
    targeted one of them or does not say what it targeted.
    """
    unknown = [k for k in filters if k not in FILTER_KEYS]
    if unknown:
        raise CollectError(f"unknown filter key {unknown[0]!r}; valid keys: {', '.join(FILTER_KEYS)}")
    kept: List[Dict[str, Any]] = []
    for record in records:
        if not all(_field_text(record, k) in set(v) for k, v in filters.items() if k != "domain"):
            continue
        if "domain" in filters:
            wanted = set(filters["domain"])
            if record.get("status", "finished") == "finished":
                record = dict(record)
                for metric in METRICS + ("val_accuracy",):
                    if isinstance(record.get(metric), dict):
                        record[metric] = {d: v for d, v in record[metric].items() if split_pair(d)[1] in wanted}
                if not record.get("accuracy"):
                    continue
            else:
                targets = record.get("target_domains") or []
                if targets and not wanted.intersection(targets):
                    continue
        kept.append(dict(record))
    return kept


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One table cell: the per-seed values and their summary."""

    values: Tuple[float, ...] = ()  # one per seed, in `seeds` order
    seeds: Tuple[Any, ...] = ()

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
    records: Iterable[Mapping[str, Any]],
    filters: Optional[Mapping[str, Sequence[str]]] = None,
    columns: str = "domain",
) -> List[Table]:
    """Turn records into tables (pure: no I/O).

    ``records`` are results.json dictionaries; ``filters`` (optional) as from
    :func:`parse_filters`. When two finished records measure the same (row, seed, column), the
    later one wins (records from :func:`load_records` are ordered by file mtime, others by list
    position) and the table gets a note.

    ``columns="domain"`` (default): one table per (dataset, protocol), sorted; a dataset's
    mean-per-class table directly follows its accuracy table. ``columns="dataset"``: one table per
    (protocol, metric) with the datasets as columns (see the module docstring).
    """
    if columns not in COLUMN_MODES:
        raise CollectError(f"unknown column layout {columns!r}; valid: {', '.join(COLUMN_MODES)}")
    records = list(records)
    if filters:
        records = filter_records(records, filters)
    order = sorted(range(len(records)), key=lambda i: (float(records[i].get("_mtime") or 0.0), i))

    groups: Dict[Tuple[str, str], _Group] = {}
    for i in order:
        rec = records[i]
        key = (str(rec.get("dataset") or "?"), str(rec.get("protocol") or "dg"))
        group = groups.setdefault(key, _Group())
        group.add_domains(rec.get("domains"))
        if rec.get("status", "finished") != "finished":
            group.failed.append(rec)
            continue
        method = str(rec.get("method") or "?")
        row_key = (method_label(rec), _backbone(rec), method)
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
                    group.pairs[col] = (_pair_sources(rec, domain), domain)
                elif PAIR_ARROW in col:
                    group.pairs[col] = split_pair(col)
                if metric == "accuracy" and col in per_seed:
                    group.duplicates.append(
                        f"{row_key[0]} / {row_key[1]} / seed {seed} / {col}: "
                        f"kept {rec.get('_path') or rec.get('run_dir') or 'a later record'}"
                    )
                per_seed[col] = float(value)

    if columns == "dataset":
        return _dataset_tables(groups)
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
            tables.append(table)
    return tables


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
            tuple(_domain_index(group.domains, d) for d in sources),
            _domain_index(group.domains, target),
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
        label, backbone = method_label(rec), _backbone(rec)
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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def format_cell(cell: Cell, ref_seeds: int, pm: str = "±", missing: str = MISSING) -> str:
    """``63.0 ± 3.0``; ``65.0`` for one seed; ``(k/n seeds)`` when below ``ref_seeds``."""
    if cell.n == 0:
        return missing
    text = f"{cell.mean:.1f}"
    if cell.std is not None:
        text += f" {pm} {cell.std:.1f}"
    if cell.n < ref_seeds:
        text += f" ({cell.n}/{ref_seeds} seeds)"
    return text


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
                out.append("| " + " | ".join(_md_escape(x) for x in [_row_label(table, row), row.backbone] + cells) + " |")
        else:
            out.append("_No finished runs._")
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
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(DATASET_CSV_FIELDS if by_dataset else CSV_FIELDS)
    for table in tables:
        for row in table.rows:
            for column, cell in [(c, row.cells[c]) for c in table.columns] + [("Avg", row.avg)]:
                stats = [
                    "" if cell.mean is None else f"{cell.mean:.4f}",
                    "" if cell.std is None else f"{cell.std:.4f}",
                    cell.n,
                ]
                head = [table.protocol, table.metric, row.label, row.backbone]
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
        return "--"
    text = f"{cell.mean:.1f}"
    if cell.std is not None:
        text += rf" $\pm$ {cell.std:.1f}"
    if cell.n < ref_seeds:
        text += rf" {{\scriptsize ({cell.n}/{ref_seeds} seeds)}}"
    return text


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
        out.append(r"\end{table}")
        for f in table.failed:
            out.append(f"% failed: {f.run_dir}: {f.error}".replace("\n", " "))
        out.append("")
    return "\n".join(out)


def _row_color(i: int, n: int):
    """Colour of the figure's i-th row of n: matplotlib's cycle up to 10 rows, tab20 beyond."""
    if n <= 10:
        return f"C{i}"
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def write_plot(tables: Sequence[Table], path: os.PathLike | str) -> None:
    """Grouped bar chart per table (domains and Avg on x, one bar per row, error bars = std).

    A row (method label, backbone) keeps one colour in every table. With several tables the
    figure has one legend, not one per table: the tables of a sweep share their rows, and the
    legends and the per-bar error bars were most of the drawing time (550 few-shot runs in 11
    tables: 2.7 s of CPU -> 1.4 s).
    """
    # The Agg canvas directly (no pyplot): no global backend state, works headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [t for t in tables if t.rows] or list(tables)
    n = max(len(shown), 1)
    bars = max([(len(t.columns) + 1) * max(len(t.rows), 1) for t in shown] or [1])
    plot_width = min(max(3.0 + 0.18 * bars, 5.0), 12.0)
    shared = n > 1  # one legend for the figure, on its right
    ncols = 2 if n > 1 and plot_width + 3.0 <= 8.5 else 1  # subplots stacked unless they are narrow
    nrows = math.ceil(n / ncols)
    width = plot_width + (0.0 if shared else 3.0)  # + the legend on the right of each table
    fig = Figure(figsize=(width * ncols, 3.6 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if not shown:
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center")
    keys = list(dict.fromkeys((r.label, r.backbone) for t in shown for r in t.rows))
    colors = {key: _row_color(i, len(keys)) for i, key in enumerate(keys)}
    handles: Dict[Tuple[str, str], Any] = {}
    for ax, table in zip(axes, shown):
        groups = table.columns + ["Avg"]
        if not table.rows:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        k = max(len(table.rows), 1)
        bar = 0.8 / k
        err_x: List[float] = []
        err_y: List[float] = []
        err_s: List[float] = []
        for j, row in enumerate(table.rows):
            cells = [row.cells[c] for c in table.columns] + [row.avg]
            xs = [i - 0.4 + bar * (j + 0.5) for i, c in enumerate(cells) if c.n]
            means = [c.mean for c in cells if c.n]
            key = (row.label, row.backbone)
            container = ax.bar(xs, means, width=bar, label=f"{row.label} [{row.backbone}]", color=colors[key])
            handles.setdefault(key, container)
            for x, c in zip(xs, (c for c in cells if c.n)):
                if c.std is not None:
                    err_x.append(x)
                    err_y.append(c.mean)
                    err_s.append(c.std)
        if err_x:  # all the table's error bars in one artist (one per bar costs ~10 ms each)
            ax.errorbar(err_x, err_y, yerr=err_s, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.set_xticks(range(len(groups)))
        long = len(groups) > 6 or any(len(g) > 14 for g in groups)
        ax.set_xticklabels(groups, rotation=20 if long else 0, ha="right" if long else "center")
        ax.set_ylim(0, 100)
        ax.set_ylabel(METRIC_TITLES.get(table.metric, table.metric))
        ax.set_title(table.title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if table.rows and not shared:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    if shared and handles:  # right of the figure; the "tight" bounding box takes it in
        fig.legend(
            [handles[key] for key in keys], [f"{label} [{backbone}]" for label, backbone in keys],
            fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
        )
    fig.savefig(path, dpi=110, bbox_inches="tight")


def write_outputs(tables: Sequence[Table], out_dir: os.PathLike | str, markdown: Optional[str] = None) -> List[Path]:
    """Write results.md/.csv/.tex/.png into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in OUTPUT_NAMES]
    md = markdown if markdown is not None else render_markdown(tables)
    paths[0].write_text("# Results\n\n" + md, encoding="utf-8")
    paths[1].write_text(render_csv(tables), encoding="utf-8")
    paths[2].write_text(render_latex(tables), encoding="utf-8")
    write_plot(tables, paths[3])
    return paths


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

EPILOG = f"""\
Filters (key=value, values comma-separated; several keys must all match):
  valid keys: {', '.join(FILTER_KEYS)}
  `label` is the table's method label, "method (variant)"; `domain` keeps only those targets.

examples:
  promptdg collect runs/
  promptdg collect runs/ method=coop,dapl backbone=vit_b16 seed=1
  promptdg collect runs/ dataset=pacs domain=art_painting,sketch -o reports/pacs
  promptdg collect runs/ protocol=dg --columns dataset     # PACS | VLCS | ... | Avg

Columns (--columns):
  domain   (default) one table per (dataset, protocol); columns = target domains + Avg; for
           protocol "uda" the columns are source→target pairs such as art→clipart or
           art+product→clipart (`domain=` still selects targets).
  dataset  one table per protocol; columns = datasets + Avg. A seed's dataset value is its mean
           over all of the dataset's tested domains (pairs for uda); a seed lacking one of them
           gives no value there (it counts as a missing seed).

Markdown goes to stdout; results.md, results.csv, results.tex and results.png are written to
DIR (or --output-dir). Exit code 2 when no record is found or a filter is invalid.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptdg collect",
        description=(
            "Collect every results.json below DIR (recursively; logs are never parsed) into "
            "paper-style tables: one per (dataset, protocol), rows = method x backbone, columns = "
            "target domains + Avg (or datasets + Avg with --columns dataset), cells = mean ± sample std "
            "over seeds."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="directory searched recursively for results.json")
    parser.add_argument("filters", metavar="key=value", nargs="*", help="keep only matching records")
    parser.add_argument(
        "-o", "--output-dir", metavar="OUT", default=None,
        help="where to write results.{md,csv,tex,png} (default: DIR)",
    )
    parser.add_argument(
        "--columns", choices=COLUMN_MODES, default="domain",
        help="table columns: 'domain' = target domains (uda: source→target pairs) per (dataset, "
             "protocol) table (default); 'dataset' = one column per dataset, one table per protocol",
    )
    return parser


def _err(msg: str) -> None:
    print(f"promptdg collect: {msg}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.dir)
    try:
        filters = parse_filters(args.filters)
        if not root.is_dir():
            raise CollectError(f"{root} is not a directory")
        loaded = load_records(root)
        if loaded.skipped:
            _err(
                f"warning: skipped {len(loaded.skipped)} unreadable or invalid {RESULTS_NAME} "
                f"file(s):"
            )
            for path, reason in loaded.skipped[:10]:
                print(f"  {path}: {reason}", file=sys.stderr)
            if len(loaded.skipped) > 10:
                print(f"  … and {len(loaded.skipped) - 10} more", file=sys.stderr)
        if not loaded.records:
            raise CollectError(f"no usable {RESULTS_NAME} found below {root}")
        records = filter_records(loaded.records, filters) if filters else loaded.records
        if not records:
            shown = " ".join(args.filters)
            hints = "; ".join(
                f"{k} values: {', '.join(sorted({_field_text(r, k) for r in loaded.records})[:12])}"
                for k in filters if k != "domain"
            )
            raise CollectError(
                f"no record below {root} matches {shown} ({len(loaded.records)} records found"
                + (f"; {hints}" if hints else "") + ")"
            )
        tables = collect_tables(records, columns=args.columns)
    except CollectError as exc:
        _err(f"error: {exc}")
        return 2

    markdown = render_markdown(tables)
    sys.stdout.write(markdown)
    sys.stdout.flush()
    n_failed = sum(len(t.failed) for t in tables)
    try:
        paths = write_outputs(tables, args.output_dir or root, markdown)
    except OSError as exc:
        _err(f"error: cannot write results: {exc}")
        return 1
    _err(
        f"{len(records)} record(s) ({len(records) - n_failed} finished, {n_failed} not) in "
        f"{len(tables)} table(s); wrote {', '.join(str(p) for p in paths)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
