"""Accuracy against shots per class, per dataset, as the CoOp and DAPT papers draw it: written by
``promptdg collect`` when a dataset has finished runs at two or more shot counts.

A point is one (dataset, method label without the shot count, backbone, shots): the mean over seeds
of each seed's accuracy averaged over the targets it tested (a seed's runs of one point are merged
first, as in the tables), with the sample std over seeds. Zero-shot CLIP (a ``zeroshot`` run without
shots on that dataset and backbone) is the point at 0 shots, as CoOp's figure puts it. The x axis
spaces 0, 1, 2, 4, 8, 16 evenly. ``shots.csv`` holds the points; ``shots.png`` one panel per dataset
(matplotlib only draws).
"""
from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

from ..extras import require
from .records import as_mapping, backbone_label

SHOTS_NAMES = ("shots.csv", "shots.png")
SHOTS_FIELDS = ("dataset", "label", "backbone", "shots", "mean", "std", "seeds")
ZERO_SHOT = "zeroshot"


def _label(rec: Mapping[str, Any]) -> str:
    method = str(rec.get("method") or "?")
    return f"{method} ({rec['variant']})" if rec.get("variant") else method


def shot_points(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The figure's points, for the datasets with finished runs at two or more shot counts."""
    per_seed: Dict[Tuple[str, str, str, int], Dict[Any, Dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for rec in map(as_mapping, records):
        if str(rec.get("status") or "finished") != "finished" or not rec.get("accuracy"):
            continue
        shots = rec.get("shots")
        if not shots and rec.get("method") != ZERO_SHOT:
            continue
        key = (str(rec.get("dataset")), _label(rec), backbone_label(rec), int(shots or 0))
        per_seed[key][rec.get("seed")].update({d: float(v) for d, v in rec["accuracy"].items()})
    counts = defaultdict(set)
    for dataset, _, _, shots in per_seed:
        if shots:
            counts[dataset].add(shots)
    wanted = {d for d, s in counts.items() if len(s) >= 2}
    zero_backbones = {(d, b) for d, _, b, s in per_seed if s}
    points = []
    for (dataset, label, backbone, shots), seeds in sorted(per_seed.items()):
        if dataset not in wanted or (not shots and (dataset, backbone) not in zero_backbones):
            continue
        values = [statistics.fmean(acc.values()) for acc in seeds.values()]
        points.append(
            {
                "dataset": dataset,
                "label": label,
                "backbone": backbone,
                "shots": shots,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "seeds": len(values),
            }
        )
    return points


def render_shots_csv(points: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, SHOTS_FIELDS, lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({k: "" if p.get(k) is None else p[k] for k in SHOTS_FIELDS})
    return out.getvalue()


def write_shots_plot(points: Sequence[Mapping[str, Any]], path: os.PathLike | str) -> None:
    require("plots", "the figure shots.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted({p["dataset"] for p in points})
    cols = min(3, max(len(datasets), 1))
    nrows = max(math.ceil(len(datasets) / cols), 1)
    fig = Figure(figsize=(4.2 * cols, 3.6 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(datasets):]:
        ax.set_visible(False)
    for ax, dataset in zip(axes, datasets):
        mine = [p for p in points if p["dataset"] == dataset]
        ticks = sorted({p["shots"] for p in mine})
        x = {s: i for i, s in enumerate(ticks)}  # 0, 1, 2, 4, 8, 16 evenly spaced
        for i, key in enumerate(sorted({(p["label"], p["backbone"]) for p in mine})):
            line = sorted((p for p in mine if (p["label"], p["backbone"]) == key), key=lambda p: p["shots"])
            name = f"{key[0]} [{key[1]}]"
            if all(p["shots"] == 0 for p in line):  # zero-shot CLIP: a star at 0 shots
                ax.plot(
                    [x[0]],
                    [line[0]["mean"]],
                    marker="*",
                    markersize=12,
                    linestyle="none",
                    color=f"C{i % 10}",
                    label=name,
                )
                continue
            ax.errorbar([x[p["shots"]] for p in line], [p["mean"] for p in line], yerr=[p["std"] or 0.0 for p in line],
                        marker="o", capsize=3, color=f"C{i % 10}", label=name)
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels([str(s) for s in ticks])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(dataset)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
