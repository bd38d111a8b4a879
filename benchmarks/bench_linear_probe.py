"""Linear-probe benchmark: the former scikit-learn C sweep against the torch L-BFGS path
(``promptdg_cli/logreg.py``, ``methods/linear_probe.py``).

Both sweeps are the probe's: 13 log-spaced C values over [c_min, c_max], then ``refine_steps``
values around the best, selected on validation accuracy, max_iter 1000.

* sklearn: ``LogisticRegression(C, max_iter)`` (lbfgs, multinomial) fitted cold for every C, as the
  probe did before (absolute gradient tolerance 1e-4);
* sklearn_same_rule: the same sweep with promptdg's stopping rule (``tol`` = the probe's gradient
  tolerance, ``method.tol`` x the max-abs gradient at the cold start; scikit-learn's ``gtol`` is on the
  gradient of the same objective, see ``promptdg_cli/logreg.py``). The default 1e-4 is absolute;
  where the objective's gradient is about that small from the start it stops fits after a step or
  two, and their accuracy is that of wherever the solver stopped (on the demo's printed target,
  C = 359.38 as a NumPy float64 gives 58.06 %, the same value as a Python float 56.39 %: NumPy's type
  promotion on float32 features changes the rounding; converged, 57.22 %).
  Even at the same rule a cold fit at a large C can stop far from its minimiser (the objective is
  flat there: a small gradient bounds the distance to the minimiser only by gradient x C x n);
* torch: ``LinearProbe.fit`` itself (warm-started path, its patience stop, checkpoints included), float32.

Problems are synthetic, shaped like a benchmark: K classes, D-dim L2-normalised features, class
means random on the sphere, each sample normalise(signal * mean + noise), noise ~ N(0, I / D).
Reported per shape: the selected C, its validation accuracy, the sweep's wall time, the speed-up.
Timings are of this process's two sweeps back to back, after one untimed sweep of each on a tiny
problem (the first fit in a process pays one-time costs, about a second for torch); run it with
nothing else on the machine.

Usage: python benchmarks/bench_linear_probe.py [--out bench/linear_probe.json]
       [--shapes demo:10x128x1200x400,domainnet:345x512x20000x5000] [--device cpu|cuda]
       [--no-same-rule]     # leave out the scikit-learn sweep at promptdg's stopping rule
       [--demo-cache DIR]   # also the demo world's 4 leave-one-domain-out problems, from the
                            # image features make demo cached in DIR (its PROMPTDG_CACHE)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from promptdg_cli.config import conf_dir
from promptdg_cli.data import Features
from promptdg_cli.methods.linear_probe import LinearProbe, start_gradient
from promptdg_cli.protocols import TrainData
from promptdg_cli.schema import LinearProbeConfig
from promptdg_cli.training import TrainContext


def sklearn_sweep(data: TrainData, cfg, tol: float = 1e-4) -> dict:
    """The former probe's sweep: a cold scikit-learn fit per C (gradient tolerance ``tol``, scikit-learn's
    default 1e-4), the first best on validation."""
    xtr, ytr, xva, yva = data.train.x.numpy(), data.train.y.numpy(), data.val.x.numpy(), data.val.y.numpy()
    scores = {}

    def fit(c):
        clf = LogisticRegression(C=np.float64(c), max_iter=cfg.max_iter, tol=tol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xtr, ytr)
        scores[float(c)] = (float((clf.predict(xva) == yva).mean() * 100), int(clf.n_iter_[0]))

    coarse = np.logspace(np.log10(cfg.c_min), np.log10(cfg.c_max), 13)
    for c in coarse:
        fit(c)
    center = max(coarse, key=lambda c: scores[float(c)][0])
    for c in np.logspace(np.log10(center) - 1, np.log10(center) + 1, cfg.refine_steps + 2)[1:-1]:
        if float(c) not in scores:
            fit(c)
    best = max(scores, key=lambda c: scores[c][0])
    return {"C": best, "val_acc": scores[best][0], "iterations": sum(s[1] for s in scores.values()),
            "at_max_iter": sum(s[1] >= cfg.max_iter for s in scores.values())}


def torch_sweep(data: TrainData, cfg, device: torch.device) -> dict:
    """``LinearProbe.fit`` as a run calls it (checkpoints in a temporary folder)."""
    n_classes = int(max(data.train.y.max(), data.val.y.max())) + 1
    probe = LinearProbe(
        cfg, SimpleNamespace(embed_dim=data.train.x.shape[1]), [str(i) for i in range(n_classes)], device
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "split").mkdir()
        probe.fit(data, TrainContext(Path(tmp), Path(tmp) / "split", "bench", 0, device))
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    fits = [line for line in lines if "n_iter" in line]
    return {
        "C": lines[-1]["selected_C"],
        "val_acc": lines[-1]["val_acc"],
        "iterations": sum(f["n_iter"] for f in fits),
        "at_max_iter": sum(f["n_iter"] >= cfg.max_iter for f in fits),
        "not_converged": sum(not f["converged"] for f in fits),
    }


def problem(k: int, d: int, n_train: int, n_val: int, signal: float, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)

    def draw(n):
        y = torch.randint(k, (n,), generator=g)
        x = torch.nn.functional.normalize(signal * means[y] + torch.randn(n, d, generator=g) / d**0.5, dim=1)
        return Features(x, y, ["synthetic"] * n, [""] * n)

    return TrainData(train=draw(n_train), val=draw(n_val))


def demo_world_problem(cache: Path, target: str, seed: int = 1) -> TrainData:
    """The demo world's leave-one-domain-out probe problem as a ``make demo`` run gets it: the demo
    CLIP's image features cached under ``cache`` (``FeatureCache``: read, not encoded again) and each
    source domain's seeded train / validation split (``train_val_indices``, the run's seed 1)."""

    from promptdg_cli.backbone import ClipBackbone
    from promptdg_cli.data import FeatureCache
    from promptdg_cli.protocols import train_val_indices

    ds = OmegaConf.load(conf_dir() / "dataset" / "demo_digits.yaml")
    ds.root = str(Path(cache) / "data")
    bb = OmegaConf.load(conf_dir() / "backbone" / "demo_clip.yaml")
    bb.cache_root = str(cache)  # (the YAML's ${cache_root})
    weights = Path(bb.pretrained)
    if not weights.is_file():
        raise SystemExit(
            f"--demo-cache {cache}: no demo CLIP at {weights} (run make demo with PROMPTDG_CACHE={cache} first)"
        )
    backbone = ClipBackbone.from_config(SimpleNamespace(model=bb.model, pretrained=str(weights), builder=None,
                                                        cache_dir=None, arch=bb.arch))
    features = FeatureCache(cache)
    train, val = [], []
    for domain in ds.domains:
        if domain != target:
            f = features.domain_features(backbone, ds, domain)
            tr, va = train_val_indices(len(f), seed, domain, ds.val_fraction)
            train.append(f.subset(tr))
            val.append(f.subset(va))
    return TrainData(train=Features.cat(train), val=Features.cat(val))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/linear_probe.json")
    ap.add_argument("--shapes", default="demo:10x128x1200x400,domainnet:345x512x20000x5000",
                    help="name:KxDxTRAINxVAL, comma-separated")
    ap.add_argument("--signal", type=float, default=0.2, help="weight of the class mean in a sample")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the torch sweep's device")
    ap.add_argument("--demo-cache", default=None, help="a promptdg cache that make demo filled: adds the demo world's "
                    "leave-one-domain-out problem of each target from its cached features")
    ap.add_argument(
        "--no-same-rule",
        action="store_true",
        help="leave out the scikit-learn sweep at promptdg's stopping "
        "rule (at 345 classes its converged fits take many minutes)",
    )
    args = ap.parse_args(argv)
    values = OmegaConf.load(conf_dir() / "method" / "linear_probe.yaml")
    values.pop("defaults")
    # the probe's defaults, as a run composes them
    cfg = OmegaConf.merge(OmegaConf.structured(LinearProbeConfig), values)
    device = torch.device(args.device)
    result = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "sweep": {k: cfg[k] for k in ("c_min", "c_max", "patience", "refine_steps", "max_iter", "tol")},
        "shapes": {},
    }
    problems = []
    for spec in filter(None, args.shapes.split(",")):
        name, dims = spec.split(":")
        k, d, n_train, n_val = (int(v) for v in dims.split("x"))
        problems.append(
            (name, lambda k=k, d=d, n_train=n_train, n_val=n_val: problem(k, d, n_train, n_val, args.signal))
        )
    if args.demo_cache:
        for target in OmegaConf.load(conf_dir() / "dataset" / "demo_digits.yaml").domains:
            problems.append(
                (f"demo_world_{target}", lambda target=target: demo_world_problem(Path(args.demo_cache), target))
            )
    # one-time costs (library loading, thread pools) before any timing
    warm = problem(4, 8, 64, 32, args.signal, seed=1)
    sklearn_sweep(warm, cfg), torch_sweep(warm, cfg, device)
    for name, make in problems:
        data = make()
        k = int(torch.unique(torch.cat([data.train.y, data.val.y])).numel())
        row = {"classes": k, "dim": data.train.x.shape[1], "n_train": len(data.train.y), "n_val": len(data.val.y)}
        present, ytr = torch.unique(data.train.y, return_inverse=True)  # as LinearProbe.fit: the classes present
        same_rule = cfg.tol * start_gradient(data.train.x.float(), ytr, len(present))
        sweeps = [("sklearn", lambda: sklearn_sweep(data, cfg)),
                  ("sklearn_same_rule", lambda: sklearn_sweep(data, cfg, tol=same_rule) | {"tol": same_rule}),
                  ("torch", lambda: torch_sweep(data, cfg, device))]
        if args.no_same_rule:
            sweeps.pop(1)
        for key, sweep in sweeps:
            t = time.perf_counter()
            row[key] = sweep() | {"sweep_s": round(time.perf_counter() - t, 2)}
            print(f"{name}: {key} {row[key]}", flush=True)
        for key, tag in (("sklearn", ""), ("sklearn_same_rule", "_same_rule")):
            if key in row:
                row["speedup" + tag] = round(row[key]["sweep_s"] / row["torch"]["sweep_s"], 2)
                row[f"val_acc_torch_minus_{key}"] = round(row["torch"]["val_acc"] - row[key]["val_acc"], 3)
        result["shapes"][name] = row
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
