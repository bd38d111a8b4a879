"""The papers' published numbers, read from ``conf/papers/<paper>.yaml`` for ``promptdg collect --paper``.

One file per paper (shipped as ``promptdg_cli/conf/papers``): its title, short name and arXiv id, and
its tables, each with its number in the paper, what its columns are (``columns_by: domain`` with a
``dataset``, or ``columns_by: dataset``), the metric, the printed decimals, the columns in promptdg's
vocabulary (domain folders as in ``conf/dataset/*.yaml``, UDA pairs as ``Art→Clipart``, dataset
names) and rows keyed by method, variant, backbone and shots, with ``values`` in column order and
the paper's printed ``average``. ``docs/reproducing.md`` describes the format for users.

:func:`load_papers` reads and checks every file: a key or value that does not fit (a row of the
wrong length, a method, variant, backbone, dataset or column that ``conf/`` does not have) is a
:class:`PaperError` naming the file, the key, the value and what would be valid.
:mod:`.paper_view` puts the values beside collect's cells. Torch-free: PyYAML reads the files.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from .records import METRICS, PAIR_ARROW, CollectError, method_label, split_pair
from .tables import Cell

COLUMNS_BY = ("domain", "dataset")
FILE_KEYS = ("paper", "short", "authors", "venue", "arxiv", "tables", "not_transcribed")
TABLE_KEYS = ("table", "caption", "columns_by", "dataset", "metric", "decimals", "columns", "average_over", "rows")
ROW_KEYS = ("paper_row", "method", "variant", "backbone", "shots", "values", "average")


class PaperError(CollectError):
    """A paper file that does not fit the format (the message names the file, the key and the value)."""


@dataclass(frozen=True)
class PaperRow:
    paper_row: str  # the row's name as printed in the paper
    method: str
    variant: str
    backbone: str
    shots: Optional[int]
    values: Dict[str, float]  # column -> printed value
    average: Optional[float]

    @property
    def label(self) -> str:
        """The collect row label this row matches (``method (variant, k-shot)``)."""
        return method_label({"method": self.method, "variant": self.variant, "shots": self.shots})


@dataclass(frozen=True)
class PaperTable:
    short: str  # the paper's short name, e.g. "PromptStyler"
    arxiv: Optional[str]
    table: str  # the table's number in the paper
    file: str
    columns_by: str  # "domain" | "dataset"
    dataset: Optional[str]  # columns_by == "domain": the dataset the columns belong to
    metric: str
    decimals: int
    columns: Tuple[str, ...]
    average_over: Tuple[str, ...]
    rows: Tuple[PaperRow, ...]

    @property
    def source(self) -> str:
        return f"{self.short} Tab. {self.table}"


@dataclass(frozen=True)
class PaperCell:
    """The paper value of one collect cell (``Cell.paper``)."""

    value: float
    decimals: int
    source: str  # "PromptStyler Tab. 2"

    @property
    def rounding(self) -> float:
        return 0.5 * 10.0 ** -self.decimals

    def delta(self, cell: Cell) -> Optional[float]:
        return None if cell.mean is None else cell.mean - self.value

    def within(self, cell: Cell) -> Optional[bool]:
        """|delta| <= max(std, rounding) (a float tolerance of 1e-9 absorbs binary fractions)."""
        d = self.delta(cell)
        return None if d is None else abs(d) <= max(cell.std or 0.0, self.rounding) + 1e-9


# --------------------------------------------------------------------------------------------
# Reading conf/papers
# --------------------------------------------------------------------------------------------


def papers_dir() -> Path:
    """conf/papers inside an installed wheel (promptdg_cli/conf/papers), else the repository's."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf" / "papers", package.parent / "conf" / "papers"):
        if candidate.is_dir():
            return candidate
    raise PaperError(f"promptdg's conf/papers directory was not found next to {package}")


def _fail(where: str, key: str, value: Any, valid: str) -> PaperError:
    return PaperError(f"{where}: {key}={value!r} is not valid; expected {valid}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(where: str, data: Mapping[str, Any], key: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        raise _fail(where, key, value, "a non-empty string")
    return value


def _unknown(where: str, data: Any, keys: Sequence[str]) -> None:
    if not isinstance(data, dict):
        raise PaperError(f"{where}: {data!r} is not a mapping (keys: {', '.join(keys)})")
    extra = [k for k in data if k not in keys]
    if extra:
        raise PaperError(f"{where}: unknown key {extra[0]!r}; valid keys: {', '.join(keys)}")


def _row(where: str, data: Any, columns: Tuple[str, ...]) -> PaperRow:
    _unknown(where, data, ROW_KEYS)
    values = data.get("values")
    if not isinstance(values, list) or len(values) != len(columns) or not all(_number(v) for v in values):
        raise _fail(where, "values", values, f"a list of {len(columns)} numbers, one per column ({', '.join(columns)})")
    average = data.get("average")
    if average is not None and not _number(average):
        raise _fail(where, "average", average, "a number (the paper's printed average) or null")
    shots = data.get("shots")
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 1):
        raise _fail(where, "shots", shots, "an integer >= 1 (k shots per class) or null")
    variant = data.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise _fail(where, "variant", variant, "a string (the method config's `variant`) or null")
    return PaperRow(
        paper_row=_text(where, data, "paper_row"), method=_text(where, data, "method"), variant=variant or "",
        backbone=_text(where, data, "backbone"), shots=shots, values=dict(zip(columns, map(float, values))),
        average=None if average is None else float(average),
    )


def _table(where: str, data: Any, short: str, arxiv: Optional[str], file: str) -> PaperTable:
    _unknown(where, data, TABLE_KEYS)
    table = data.get("table")
    if not isinstance(table, (str, int)) or isinstance(table, bool) or str(table) == "":
        raise _fail(where, "table", table, "the table's number in the paper, e.g. \"2\" or C1")
    columns_by = data.get("columns_by")
    if columns_by not in COLUMNS_BY:
        raise _fail(where, "columns_by", columns_by, " or ".join(COLUMNS_BY))
    dataset = data.get("dataset")
    if columns_by == "domain" and (not isinstance(dataset, str) or not dataset):
        raise _fail(where, "dataset", dataset, "the dataset (conf/dataset name) whose domains are the columns")
    if columns_by == "dataset" and dataset is not None:
        raise _fail(where, "dataset", dataset, "null (columns_by: dataset names the datasets as columns)")
    metric = data.get("metric", "accuracy")
    if metric not in METRICS:
        raise _fail(where, "metric", metric, " or ".join(METRICS))
    decimals = data.get("decimals", 1)
    if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 4:
        raise _fail(where, "decimals", decimals, "the number of decimals the paper prints (0-4)")
    columns = data.get("columns")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns) \
            or len(set(columns)) != len(columns):
        raise _fail(where, "columns", columns, "a non-empty list of distinct column names")
    columns = tuple(columns)
    average_over = data.get("average_over", list(columns))
    if not isinstance(average_over, list) or not average_over or not set(average_over) <= set(columns):
        raise _fail(where, "average_over", average_over, f"a non-empty subset of the columns ({', '.join(columns)})")
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list):
        raise _fail(where, "rows", raw_rows, "a list of rows")
    rows = tuple(_row(f"{where}.rows[{i}]", r, columns) for i, r in enumerate(raw_rows))
    seen: Dict[Tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        key = (r.label, r.backbone)
        if key in seen:
            raise PaperError(f"{where}.rows[{i}]: the row {r.label} / {r.backbone} repeats rows[{seen[key]}]")
        seen[key] = i
    return PaperTable(short, arxiv, str(table), file, columns_by, dataset, metric, decimals, columns,
                      tuple(c for c in columns if c in average_over), rows)


def read_paper_file(path: os.PathLike | str) -> List[PaperTable]:
    """The tables of one paper file; raises :class:`PaperError` naming the key and the value."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PaperError(f"{path}: cannot read the paper file: {exc}") from None
    where = str(path)
    _unknown(where, data, FILE_KEYS)
    short = _text(where, data, "short")
    _text(where, data, "paper")
    arxiv = data.get("arxiv")
    if arxiv is not None and not isinstance(arxiv, str):
        raise _fail(where, "arxiv", arxiv, "the arXiv id as a quoted string, e.g. \"2307.15199\", or null")
    tables = data.get("tables")
    if not isinstance(tables, list):
        raise _fail(where, "tables", tables, "a list of tables (empty when none is transcribed)")
    return [_table(f"{where}: tables[{i}]", t, short, arxiv, str(path)) for i, t in enumerate(tables)]


def load_papers(extra: Iterable[os.PathLike | str] = (), builtin: bool = True) -> List[PaperTable]:
    """Every table of ``conf/papers/*.yaml`` (alphabetical; ``builtin=False`` skips them), then those of
    the ``extra`` files in the order given, each checked against ``conf/`` (:func:`check_keys`)."""
    paths = sorted(papers_dir().glob("*.yaml")) if builtin else []
    tables: List[PaperTable] = []
    for path in [*paths, *map(Path, extra)]:
        tables.extend(read_paper_file(path))
    check_keys(tables, Vocabulary.read(papers_dir().parent))
    return tables


# --------------------------------------------------------------------------------------------
# The keys a row may use: what conf/ defines
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    variants: Dict[str, Tuple[str, ...]]  # method name -> the variants its configs define ("" = none)
    domains: Dict[str, Tuple[str, ...]]  # dataset name -> its domain folders
    backbones: Tuple[str, ...]

    @classmethod
    def read(cls, conf: Path) -> "Vocabulary":
        """From ``conf/method``, ``conf/dataset`` and ``conf/backbone`` (each YAML's ``name`` and
        ``variant`` / ``domains``)."""
        def load(group: str) -> List[dict]:
            return [yaml.safe_load(p.read_text(encoding="utf-8")) or {} for p in sorted((conf / group).glob("*.yaml"))]

        variants: Dict[str, Tuple[str, ...]] = {}
        for m in load("method"):
            if m.get("name"):
                variants[m["name"]] = variants.get(m["name"], ()) + (str(m.get("variant") or ""),)
        domains = {d["name"]: tuple(d.get("domains") or ()) for d in load("dataset") if d.get("name")}
        return cls(variants, domains, tuple(b["name"] for b in load("backbone") if b.get("name")))


def _column_problem(table: PaperTable, column: str, vocab: Vocabulary) -> Optional[str]:
    if table.columns_by == "dataset":
        return None if column in vocab.domains else f"a dataset of conf/dataset ({', '.join(sorted(vocab.domains))})"
    domains = vocab.domains.get(table.dataset or "", ())
    sources, target = split_pair(column)
    if all(d in domains for d in (*sources, target)) and (PAIR_ARROW not in column or sources):
        return None
    return (
        f"a domain of {table.dataset} ({', '.join(domains)}) or a pair of them such as "
        f"{domains[0] if domains else 'a'}{PAIR_ARROW}..."
    )


def check_keys(tables: Sequence[PaperTable], vocab: Vocabulary) -> None:
    """Raise :class:`PaperError` for the first dataset, column, method, variant or backbone that
    ``conf/`` does not define (so that a typo never silently matches nothing)."""
    for t in tables:
        where = f"{t.file}: table {t.table}"
        if t.columns_by == "domain" and t.dataset not in vocab.domains:
            raise _fail(where, "dataset", t.dataset, f"a dataset of conf/dataset ({', '.join(sorted(vocab.domains))})")
        for column in t.columns:
            problem = _column_problem(t, column, vocab)
            if problem:
                raise _fail(where, "columns", column, problem)
        for r in t.rows:
            here = f"{where}, row {r.paper_row!r}"
            if r.method not in vocab.variants:
                raise _fail(here, "method", r.method, f"a method of conf/method ({', '.join(sorted(vocab.variants))})")
            if r.variant not in vocab.variants[r.method]:
                valid = ", ".join(repr(v) for v in vocab.variants[r.method])
                raise _fail(here, "variant", r.variant, f"a variant of method {r.method} ({valid}; '' = none)")
            if r.backbone not in vocab.backbones:
                raise _fail(here, "backbone", r.backbone, f"a backbone of conf/backbone ({', '.join(vocab.backbones)})")
