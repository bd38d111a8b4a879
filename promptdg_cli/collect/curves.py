"""``promptdg collect DIR --curves``: training curves from each run's ``metrics.jsonl`` (the training
loop's line per epoch: the epoch's mean of each loss term, the learning rate, ``val_acc`` where the
method validates), never from logs.

``curves.csv`` (long format): run folder, method, variant, dataset, backbone, seed, shots, split (the
model's key: the held-out domain, a UDA pair, ``all``), epoch, metric, value. ``curves.png``: one
panel per metric (at most :data:`MAX_PANELS`, the loss terms first), epoch on x, one line per
(dataset, method label, backbone, split) at the mean over seeds, the band spanning the seeds' lowest
to highest value. A run without ``metrics.jsonl`` (zero-shot) adds nothing. matplotlib only draws.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

from ..extras import require
from .records import as_mapping, backbone_label, method_label

CURVES_NAMES = ("curves.csv", "curves.png")
CURVE_FIELDS = (
    "run_dir",
    "method",
    "variant",
    "dataset",
    "backbone",
    "seed",
    "shots",
    "split",
    "epoch",
    "metric",
    "value",
)
NOT_CURVES = {"time", "target", "epoch"}
MAX_PANELS = 6


def load_curves(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The long rows of every finished record's ``metrics.jsonl`` (epoch lines only)."""
    rows: List[Dict[str, Any]] = []
    for rec in map(as_mapping, records):
        if str(rec.get("status") or "finished") != "finished":
            continue
        run_dir = os.path.dirname(str(rec["_path"])) if rec.get("_path") else str(rec.get("run_dir") or "")
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        base = {
            "run_dir": run_dir,
            **{k: rec.get(k) for k in ("method", "variant", "dataset", "backbone", "seed", "shots")},
        }
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut by a crash
                    continue
                if "epoch" not in entry:
                    continue
                for metric, value in entry.items():
                    if (
                        metric in NOT_CURVES
                        or isinstance(value, bool)
                        or not isinstance(value, (int, float))
                        or not math.isfinite(value)
                    ):
                        continue
                    rows.append(
                        {
                            **base,
                            "split": entry.get("target"),
                            "epoch": int(entry["epoch"]),
                            "metric": metric,
                            "value": float(value),
                        }
                    )
    return rows


def render_curves_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CURVE_FIELDS})
    return out.getvalue()


def curve_lines(rows: Iterable[Mapping[str, Any]]) -> Dict[str, Dict[Tuple[str, ...], Dict[int, List[float]]]]:
    """metric -> line (dataset, label, backbone, split) -> epoch -> the seeds' values."""
    lines: Dict[str, Dict[Tuple[str, ...], Dict[int, List[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in rows:
        key = (str(r["dataset"]), method_label(r), backbone_label(r), str(r["split"]))
        lines[r["metric"]][key][r["epoch"]].append(r["value"])
    return lines


def _panel_order(metric: str) -> Tuple[int, str]:
    return (2 if metric == "lr" else 1 if "acc" in metric else 0, metric)


def write_curves_plot(rows: Sequence[Mapping[str, Any]], path: os.PathLike | str) -> None:
    require("plots", "the figure curves.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    lines = curve_lines(rows)
    metrics = sorted(lines, key=_panel_order)[:MAX_PANELS]
    cols = min(3, max(len(metrics), 1))
    nrows = max(math.ceil(len(metrics) / cols), 1)
    fig = Figure(figsize=(4.2 * cols + 2.5, 3.2 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    keys = sorted({k for m in metrics for k in lines[m]})
    handles: Dict[Tuple[str, ...], Any] = {}  # a line per key, for the figure's legend
    for ax, metric in zip(axes, metrics):
        for i, key in enumerate(keys):
            per_epoch = lines[metric].get(key)
            if not per_epoch:
                continue
            epochs = sorted(per_epoch)
            means = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
            (line,) = ax.plot(epochs, means, color=f"C{i % 10}", label=" | ".join(key))
            ax.fill_between(
                epochs,
                [min(per_epoch[e]) for e in epochs],
                [max(per_epoch[e]) for e in epochs],
                color=f"C{i % 10}",
                alpha=0.15,
            )
            handles.setdefault(key, line)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if handles:
        fig.legend(
            list(handles.values()),
            [" | ".join(k) for k in handles],
            loc="center right",
            fontsize="small",
            title="dataset | method | backbone | split",
        )
    fig.tight_layout(rect=(0, 0, 0.8 if handles else 1, 1))
    fig.savefig(str(path), dpi=110)
