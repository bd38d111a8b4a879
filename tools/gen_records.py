#!/usr/bin/env python
"""Synthetic ``results.json`` records, built as :class:`promptdg_cli.record.RunRecord` (so they match the
schema the engine writes and ``collect`` reads), for timing and testing ``collect``.

The default grid is DAPT's few-shot table: methods {coop, dapt, linear_probe} x 11 datasets x shots
{1, 2, 4, 8, 16} x seeds {1, 2, 3} on vit_b16 (495 runs), plus zero-shot CLIP rows (no shots) on
vit_b16 and rn50, with a few failed runs and a few missing seeds. The records sit where a sweep
puts them (``<root>/<dataset>/<method>/<backbone>/seed<s>_all_<k>shot_<hash>/results.json``) and
carry the record's fields (status, method, variant, dataset, backbone, protocol, seed, shots,
target/source domains, accuracy, avg_accuracy, val_accuracy, timings, ...; failed runs: error and
traceback).

    python tools/gen_records.py /tmp/records                 # write them
    python tools/gen_records.py /tmp/records --time          # ... and time `promptdg collect` on them
    promptdg collect /tmp/records --columns dataset            # the table, datasets as columns
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's promptdg_cli

from promptdg_cli.collect import main as collect_main  # noqa: E402  (torch-free)
from promptdg_cli.record import RunRecord  # noqa: E402

DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
METHODS = ("coop", "dapt", "linear_probe")
SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
ZS_VARIANT = "a photo of a [class]."
OOM = ("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
       "Traceback (most recent call last):\n  File \"promptdg_cli/engine.py\", line 1, in run\n")


def _hash(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:10]


def record(method: str, dataset: str, backbone: str, seed: int, shots, rng: random.Random, run_dir: Path,
           status: str = "finished") -> RunRecord:
    """One few-shot run's record, as ``engine.run`` writes it (the split key is the dataset)."""
    chash = _hash(method, dataset, backbone, seed, shots)
    rec = {
        "status": status,
        "method": method,
        "variant": ZS_VARIANT if method == "zeroshot" else "",
        "dataset": dataset,
        "backbone": backbone,
        "model": {"vit_b16": "ViT-B-16-quickgelu", "rn50": "RN50-quickgelu"}.get(backbone, backbone),
        "pretrained": "openai",
        "protocol": "fewshot",
        "seed": seed,
        "domains": [],
        "config_hash": chash,
        "run_dir": str(run_dir),
        "version": "0.1.0",
        "git_revision": "0123456789ab",
        "host": "node01",
        "shots": shots,
    }
    if status != "finished":
        rec.update(target_domains=[dataset], error=OOM, traceback=OOM)
        return RunRecord(**rec)
    base = 40.0 + 3.0 * DATASETS.index(dataset) if dataset in DATASETS else 50.0
    gain = {"zeroshot": 0.0, "linear_probe": 2.0, "coop": 5.0, "dapt": 7.0}.get(method, 1.0)
    acc = round(min(99.0, base + gain + 2.0 * (shots or 0) ** 0.5 + rng.gauss(0, 0.8)), 4)
    rec.update(
        target_domains=[dataset],
        source_domains={dataset: []},
        accuracy={dataset: acc},
        val_accuracy={dataset: round(acc + 5.0, 4)},
        avg_accuracy=acc,
        timings={"train_s": 120.0, "eval_s": 8.0, "total_s": 130.0},
        peak_memory_mb={"cpu_rss": 4100.0, "cuda": 9000.0},
        feature_cache={"hits": 3, "misses": 0},
    )
    return RunRecord(**rec)


def generate(root, methods=METHODS, datasets=DATASETS, shots=SHOTS, seeds=SEEDS, backbones=("vit_b16",),
             zeroshot_backbones=("vit_b16", "rn50"), n_failed: int = 6, n_missing: int = 9, seed: int = 0) -> dict:
    """Write the records below ``root``. Returns what was written: ``records`` (count), ``failed``
    (run dirs), ``missing`` ((method, backbone, dataset, shots, seed) never written), ``grid``."""
    root = Path(root)
    rng = random.Random(seed)
    grid = [(m, b, d, k, s) for m in methods for b in backbones for d in datasets for k in shots for s in seeds]
    grid += [("zeroshot", b, d, None, s) for b in zeroshot_backbones for d in datasets for s in seeds]
    picks = rng.sample(range(len(grid)), n_failed + n_missing)
    failed, missing = set(picks[:n_failed]), set(picks[n_failed:])
    out = {"records": 0, "failed": [], "missing": [], "grid": len(grid)}
    for i, (m, b, d, k, s) in enumerate(grid):
        if i in missing:
            out["missing"].append((m, b, d, k, s))
            continue
        name = f"seed{s}_all_{f'{k}shot_' if k else ''}{_hash(m, d, b, s, k)}"
        run_dir = root / d / m / b / name
        rec = record(m, d, b, s, k, rng, run_dir, status="failed" if i in failed else "finished")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(rec.to_dict(), indent=2))
        (run_dir / "metrics.jsonl").write_text("")
        if i in failed:
            out["failed"].append(str(run_dir))
        out["records"] += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="folder to write the records into")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--shots", default=",".join(map(str, SHOTS)))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--backbones", default="vit_b16")
    ap.add_argument("--failed", type=int, default=6, help="runs written as failed")
    ap.add_argument("--missing", type=int, default=9, help="runs left out (partial seed counts)")
    ap.add_argument("--time", action="store_true", help="then time `promptdg collect ROOT` (both column layouts)")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    info = generate(args.root, split(args.methods), split(args.datasets), [int(k) for k in split(args.shots)],
                    [int(s) for s in split(args.seeds)], split(args.backbones), n_failed=args.failed,
                    n_missing=args.missing)
    print(f"wrote {info['records']} records ({len(info['failed'])} failed, {len(info['missing'])} left out) "
          f"below {args.root}")
    if args.time:
        for extra in ([], ["--columns", "dataset"]):
            sink = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                code = collect_main([args.root, *extra])
            print(f"promptdg collect {args.root} {' '.join(extra)}: {time.perf_counter() - t:.2f} s (exit {code}, "
                  f"incl. results.md/.csv/.tex/.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
