"""The figure of ``promptdg collect`` (``results.png``): a grouped bar chart per table. matplotlib is
imported only when a figure is drawn."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence, Tuple

from ..extras import require
from .tables import METRIC_TITLES, Table


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
    require("plots", "the figure results.png")
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
                    assert c.mean is not None  # (two seeds or more)
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
