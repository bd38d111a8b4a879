"""``promptdg collect DIR [key=value ...]``: the command line; reads the records, prints the
markdown tables and writes results.md/.csv/.tex/.png."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..extras import message, missing
from ..record import RESULTS_NAME
from . import paper, paper_view
from .analysis import write_analysis
from .plot import write_plot
from .records import FILTER_KEYS, CollectError, field_text, filter_records, load_records, parse_filters
from .render import render_csv, render_latex, render_markdown
from .tables import COLUMN_MODES, Table, collect_tables

OUTPUT_NAMES = ("results.md", "results.csv", "results.tex", "results.png")


def write_outputs(tables: Sequence[Table], out_dir: os.PathLike | str, markdown: Optional[str] = None) -> List[Path]:
    """Write results.md/.csv/.tex/.png into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in OUTPUT_NAMES]
    md = markdown if markdown is not None else render_markdown(tables)
    paths[0].write_text("# Results\n\n" + md, encoding="utf-8")
    paths[1].write_text(render_csv(tables), encoding="utf-8")
    paths[2].write_text(render_latex(tables), encoding="utf-8")
    if missing("plots"):  # the tables need no matplotlib; main() says why the figure is not there
        return paths[:3]
    write_plot(tables, paths[3])
    return paths


EPILOG = f"""\
Filters (key=value, values comma-separated; several keys must all match):
  valid keys: {', '.join(FILTER_KEYS)}
  `label` is the table's method label, "method (variant)"; `domain` keeps only those targets.

examples:
  promptdg collect runs/
  promptdg collect runs/ method=coop,dapl backbone=vit_b16 seed=1
  promptdg collect runs/ dataset=pacs domain=art_painting,sketch -o reports/pacs
  promptdg collect runs/ protocol=dg --columns dataset     # PACS | VLCS | ... | Avg
  promptdg collect runs/ --columns dataset --paper         # each cell beside the paper's number

Columns (--columns):
  domain   (default) one table per (dataset, protocol); columns = target domains + Avg; for
           protocol "uda" the columns are source→target pairs such as art→clipart or
           art+product→clipart (`domain=` still selects targets).
  dataset  one table per protocol; columns = datasets + Avg. A seed's dataset value is its mean
           over all of the dataset's tested domains (pairs for uda); a seed lacking one of them
           gives no value there (it counts as a missing seed).

Paper values (--paper): a cell that a paper in conf/papers/ reports reads
  84.1 ± 0.3 (paper 84.4, −0.3)   (delta = promptdg's mean − the paper's value),
and a summary after each table counts, per row, the cells with a paper value and those within
the seeds' spread: |delta| <= max(s, r), s = the cell's sample std over seeds (0 for one seed),
r = half a unit of the paper's last printed decimal. CSV: extra columns (paper, delta, ...).
Rows match by method, variant, shots and backbone; columns by domain, pair or dataset.
See docs/reproducing.md.

Markdown goes to stdout; results.md, results.csv, results.tex and results.png are written to
DIR (or --output-dir), with runs.csv (one row per run and target, for pandas), shots.csv/.png (accuracy
against shots per class, when a dataset has two or more shot counts) and, with --curves,
curves.csv/.png (the training curves of every run's metrics.jsonl). Exit code 2 when no record is \
found or a filter is invalid.
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
        "--curves", action="store_true",
        help="also write curves.csv and curves.png: the training curves of every run's metrics.jsonl",
    )
    parser.add_argument(
        "--columns", choices=COLUMN_MODES, default="domain",
        help="table columns: 'domain' = target domains (uda: source→target pairs) per (dataset, "
             "protocol) table (default); 'dataset' = one column per dataset, one table per protocol",
    )
    parser.add_argument(
        "--paper", action="store_true",
        help="print the papers' published number and the difference in every cell that conf/papers/*.yaml reports",
    )
    parser.add_argument(
        "--paper-file", metavar="YAML", action="append", default=[],
        help="another paper file in conf/papers' format (repeatable; implies --paper)",
    )
    return parser


def _err(msg: str) -> None:
    print(f"promptdg collect: {msg}", file=sys.stderr)


def _report_skipped(skipped: Sequence[tuple]) -> None:
    """One warning line per file that was not read: the file and why (the field that does not
    match the record schema, a newer record version, invalid JSON)."""
    if not skipped:
        return
    _err(f"warning: skipped {len(skipped)} unreadable or invalid {RESULTS_NAME} file(s):")
    for path, reason in skipped:
        print(f"  {path}: {reason}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.dir)
    try:
        filters = parse_filters(args.filters)
        if not root.is_dir():
            raise CollectError(f"{root} is not a directory")
        loaded = load_records(root)
        _report_skipped(loaded.skipped)
        if not loaded.records:
            raise CollectError(f"no usable {RESULTS_NAME} found below {root}")
        records = filter_records(loaded.records, filters) if filters else loaded.records
        if not records:
            shown = " ".join(args.filters)
            hints = "; ".join(
                f"{k} values: {', '.join(sorted({field_text(r, k) for r in loaded.records})[:12])}"
                for k in filters if k != "domain"
            )
            raise CollectError(
                f"no record below {root} matches {shown} ({len(loaded.records)} records found"
                + (f"; {hints}" if hints else "") + ")"
            )
        tables = collect_tables(records, columns=args.columns)
        if args.paper or args.paper_file:
            paper_view.annotate(tables, paper.load_papers(args.paper_file))
    except CollectError as exc:
        _err(f"error: {exc}")
        return 2

    markdown = render_markdown(tables)
    sys.stdout.write(markdown)
    sys.stdout.flush()
    n_failed = sum(len(t.failed) for t in tables)
    try:
        paths = write_outputs(tables, args.output_dir or root, markdown)
        # runs.csv, shots, curves
        more, notes = write_analysis(records, Path(args.output_dir or root), curves=args.curves)
        paths += more
    except OSError as exc:
        _err(f"error: cannot write results: {exc}")
        return 1
    if missing("plots"):
        _err(f"note: no {OUTPUT_NAMES[3]}: {message('plots', missing('plots'), 'the figure')}")
    for note in notes:
        _err(f"note: {note}")
    _err(
        f"{len(records)} record(s) ({len(records) - n_failed} finished, {n_failed} not) in "
        f"{len(tables)} table(s); wrote {', '.join(str(p) for p in paths)}"
    )
    return 0
