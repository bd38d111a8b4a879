"""``runs.csv``: every record as long-format rows, one per (run, tested target), for analysis in
pandas (``pd.read_csv("runs.csv")``) or R: no mean ± std, no merging, nothing left out.

Columns (:data:`LONG_FIELDS`): the run folder; method, variant, dataset, backbone, protocol, seed and
shots as the record has them; ``source`` (the sources the target's model trained on, joined by ``+``
in the dataset's order; empty for a source-free method) and ``target``; ``accuracy`` and
``mean_per_class_accuracy`` on that target (%), ``val_accuracy`` (% on the held-out part of the
sources, for the split that produced the target's model) and ``status``. A run that did not finish
has one row per target it was meant to test (one row with an empty target when it names none), with
empty accuracies. Empty cells are missing values (NaN in pandas).
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, Iterable, List, Mapping

from .records import METRICS, as_mapping, pair_sources, split_pair

LONG_NAME = "runs.csv"
LONG_FIELDS = ("run_dir", "method", "variant", "dataset", "backbone", "protocol", "seed", "shots", "source", "target",
               "accuracy", "mean_per_class_accuracy", "val_accuracy", "status")


def _run_dir(rec: Mapping[str, Any]) -> str:
    if rec.get("_path"):
        return os.path.dirname(str(rec["_path"]))
    return str(rec.get("run_dir") or "")


def long_rows(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of ``runs.csv`` (``None``: an empty cell), in the records' order, targets in each
    record's order."""
    rows: List[Dict[str, Any]] = []
    for rec in map(as_mapping, records):
        base = {
            "run_dir": _run_dir(rec),
            **{k: rec.get(k) for k in ("method", "variant", "dataset", "backbone", "protocol", "seed", "shots")},
        }
        status = str(rec.get("status") or "finished")
        if status != "finished":
            for target in rec.get("target_domains") or [None]:
                rows.append(
                    {
                        **base,
                        "source": None,
                        "target": target,
                        "accuracy": None,
                        "mean_per_class_accuracy": None,
                        "val_accuracy": None,
                        "status": status,
                    }
                )
            continue
        per_class = rec.get(METRICS[1]) or {}
        val = rec.get("val_accuracy") or {}
        for key, acc in (rec.get("accuracy") or {}).items():
            sources, target = split_pair(key)  # a UDA record keys its targets by "sources→target"
            if not sources:
                sources = pair_sources(rec, key)
            rows.append({**base, "source": "+".join(sources), "target": target, "accuracy": acc,
                         "mean_per_class_accuracy": per_class.get(key), "val_accuracy": val.get(key), "status": status})
    return rows


def render_long_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, LONG_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in LONG_FIELDS})
    return out.getvalue()
