"""``promptdg collect``: gather every ``results.json`` below a directory into paper-style tables.

Only JSON is read (never logs, never checkpoints), each ``results.json`` through
:meth:`promptdg_cli.record.RunRecord.from_dict`: a file that does not match the record schema (or
is of a newer record version) is reported on one warning line naming the field, and skipped,
never guessed at. Nothing heavy is imported at module level
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

The papers' numbers (``--paper``): every cell that a paper in ``conf/papers/*.yaml`` reports gets
the paper's value and the signed difference, ``84.1 ± 0.3 (paper 84.4, −0.3)``, in markdown, LaTeX and
CSV (extra columns), and each table a per-row summary of the cells within the seeds' spread
(``paper_view``'s docstring has the matching rules and the exact criterion).

Modules: ``records`` (finding, reading and filtering records; table labels), ``tables`` (rows,
columns, cells, mean ± std over seeds), ``render`` (markdown, CSV, LaTeX), ``plot`` (the PNG
figure), ``paper`` (reading and checking conf/papers), ``paper_view`` (the paper values beside the
cells), ``command`` (the command line, :func:`main`).

Python API (all importable from ``promptdg_cli.collect``): :func:`load_records`,
:func:`parse_filters`, :func:`filter_records`, :func:`collect_tables` (pure; records are
:class:`~promptdg_cli.record.RunRecord` objects or their dictionaries; returns :class:`Table`
objects; ``columns="domain" | "dataset"``), :func:`column_label` (a record's column for a target:
the domain, or the uda pair), :func:`method_label`, the ``render_*`` / ``write_*`` functions, and
:func:`main`.
"""
from .command import OUTPUT_NAMES, build_parser, main, write_outputs
from .paper import PaperError, load_papers
from .paper_view import annotate as annotate_papers
from .plot import write_plot
from .records import (
    FILTER_KEYS,
    METRICS,
    PAIR_ARROW,
    RESULTS_NAME,
    UDA,
    CollectError,
    Loaded,
    as_mapping,
    column_label,
    filter_records,
    find_results,
    load_records,
    method_label,
    parse_filters,
    split_pair,
)
from .render import (
    CSV_FIELDS,
    DATASET_CSV_FIELDS,
    MISSING,
    caption,
    format_cell,
    render_csv,
    render_latex,
    render_markdown,
)
from .tables import (
    COLUMN_MODES,
    DATASET_ORDER,
    DATASETS_TITLE,
    METRIC_TITLES,
    ZERO_SHOT,
    Cell,
    FailedRun,
    Row,
    Table,
    collect_tables,
)

__all__ = [
    "CSV_FIELDS",
    "COLUMN_MODES",
    "PaperError",
    "annotate_papers",
    "load_papers",
    "DATASET_CSV_FIELDS",
    "DATASET_ORDER",
    "DATASETS_TITLE",
    "FILTER_KEYS",
    "METRICS",
    "METRIC_TITLES",
    "MISSING",
    "OUTPUT_NAMES",
    "PAIR_ARROW",
    "RESULTS_NAME",
    "UDA",
    "ZERO_SHOT",
    "Cell",
    "CollectError",
    "FailedRun",
    "Loaded",
    "Row",
    "Table",
    "as_mapping",
    "build_parser",
    "caption",
    "collect_tables",
    "column_label",
    "filter_records",
    "find_results",
    "format_cell",
    "load_records",
    "main",
    "method_label",
    "parse_filters",
    "render_csv",
    "render_latex",
    "render_markdown",
    "split_pair",
    "write_outputs",
    "write_plot",
]
