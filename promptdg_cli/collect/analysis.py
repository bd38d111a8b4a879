"""The files ``promptdg collect`` writes for analysis beside its tables: ``runs.csv`` always (long
format, :mod:`.long`), ``shots.csv``/``.png`` when a dataset has runs at two or more shot counts
(:mod:`.shots`), ``curves.csv``/``.png`` with ``--curves`` (:mod:`.curves`). Without matplotlib the
CSVs are written and a note says which extra draws the figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

from ..extras import message, missing
from ..files import write_text_atomic
from .curves import CURVES_NAMES, load_curves, render_curves_csv, write_curves_plot
from .long import LONG_NAME, long_rows, render_long_csv
from .shots import SHOTS_NAMES, render_shots_csv, shot_points, write_shots_plot


def write_analysis(
    records: Sequence[Mapping[str, Any]], out_dir: Path, curves: bool = False
) -> Tuple[List[Path], List[str]]:
    """Write the analysis files into ``out_dir``; returns (the paths written, notes for the user)."""
    out_dir = Path(out_dir)
    written, notes = [out_dir / LONG_NAME], []
    write_text_atomic(written[0], render_long_csv(long_rows(records)))
    figures = []
    points = shot_points(records)
    if points:
        written.append(out_dir / SHOTS_NAMES[0])
        write_text_atomic(written[-1], render_shots_csv(points))
        figures.append((SHOTS_NAMES[1], lambda p: write_shots_plot(points, p)))
    if curves:
        rows = load_curves(records)
        if not rows:
            notes.append("--curves: no metrics.jsonl with epoch lines below the folder (runs that train write one)")
        else:
            written.append(out_dir / CURVES_NAMES[0])
            write_text_atomic(written[-1], render_curves_csv(rows))
            figures.append((CURVES_NAMES[1], lambda p: write_curves_plot(rows, p)))
    for name, draw in figures:
        if missing("plots"):
            notes.append(f"no {name}: {message('plots', missing('plots'), 'the figure')}")
            continue
        draw(out_dir / name)
        written.append(out_dir / name)
    return written, notes
