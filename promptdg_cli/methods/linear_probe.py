"""Linear probe (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, Sec. 3.2, https://arxiv.org/abs/2103.00020).

A multinomial logistic regression (L-BFGS, L2-regularised) on frozen, cached CLIP image features of
the labelled source images. The inverse regularisation strength C is chosen on the source
validation split, never on the target. The objective is scikit-learn's LogisticRegression's (CLIP's
solver), minimised by full-batch L-BFGS in torch on the run's device (``promptdg_cli/logreg.py``).

The sweep: 13 log-spaced values of C over [c_min, c_max] fitted as a regularisation path (in
increasing order, each fit warm-started from the previous solution). With ``patience`` set, the path
stops once that many consecutive values have not raised the best validation accuracy (the larger C
values are the slowest fits: ill-conditioned, and on separable features unbounded); the values
left out are logged as skipped. Then ``refine_steps`` values around the best one, fitted as two
short paths that leave the best path value upward and downward (each from its neighbour's
solution, 2 / (refine_steps + 1) decades away). Every fit converges to the unique minimiser of its
objective; a warm start only shortens the way there. Features and weights are float32 (the
objective's sum is accumulated in float64): on the CPU it halves an iteration's time against
float64, with the same validation accuracy at each of the 13 path values on the benchmark's
65-class problem (``benchmarks/bench_linear_probe.py``'s problem 65 x 512 x 8000).

Resume: the loop's units, a checkpoint after every fitted C (its accuracy and its solution, the warm
start of what follows), so a resumed sweep starts each remaining fit from the same weights as an
uninterrupted one. torchrun: every rank fits the same deterministic sequence.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..logreg import cold_start, fit_logreg, objective_and_grad
from ..schema import LinearProbeConfig
from .base import Method

DTYPE = torch.float32  # features and weights (see the module docstring and benchmarks/bench_linear_probe.py)
# in the checkpoint's unit names: a checkpoint of an earlier sweep (scikit-learn, float64) is not reused
SOLVER = "lbfgs-torch-f32"


def start_gradient(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> float:
    """Max-abs gradient of the objective at the cold start (W = 0, b = log class frequencies): the
    scale of a fit's stopping tolerance. The gradient in b vanishes there; what is left is what
    W has to fit, the same for every C."""
    _, g = objective_and_grad(cold_start(y, n_classes, x.shape[1], x.dtype), x, y, 1.0)
    return float(g.abs().max())


def refine_start(c: float, center: float, fine: list[float]) -> Optional[float]:
    """The value a refinement fit at ``c`` starts from: its neighbour towards ``center`` among the
    refinement values ``fine`` on the same side of it, or None where that neighbour is ``center``
    itself (the path's solution)."""
    side = [f for f in fine if (center < f < c) or (c < f < center)]
    return min(side, key=lambda f: abs(math.log(f) - math.log(c))) if side else None


def refine_order(center: float, fine: list[float]) -> list[float]:
    """The refinement values in the order their warm starts need: upward from ``center``, then downward."""
    return sorted(f for f in fine if f > center) + sorted((f for f in fine if f < center), reverse=True)


def out_of_patience(done: dict, patience: Optional[int]) -> bool:
    """True when the last ``patience`` fitted path values (``done``, in path order) all stayed at or
    below the best validation accuracy reached before them, and that best is above the path's first
    accuracy (the flat start of strongly regularised fits, all predicting the majority class, is no peak)."""
    accs = [r["acc"] for r in done.values() if not r.get("skipped")]
    if patience is None or len(accs) <= patience:
        return False
    best = max(accs[:-patience])
    return best > accs[0] and max(accs[-patience:]) <= best


class LinearProbe(Method):
    Config = LinearProbeConfig

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        self.weight = torch.zeros(len(classnames), backbone.embed_dim)  # (C, D)
        self.bias = torch.zeros(len(classnames))  # (C,)

    def fit(self, data, ctx):
        """For each C of the sweep: fit the probe on the source training features, score it on source
        validation; keep the best C's weights (the first of equals). Which C values are fitted, in what
        order and from which warm start is the sweep's business (:meth:`sweep`: the same optima, fewer
        iterations)."""
        dev = self.device
        self.xtr, self.xva, self.yva = data.train.x.to(dev, DTYPE), data.val.x.to(dev, DTYPE), data.val.y.to(dev)
        self.classes, self.ytr = torch.unique(data.train.y.to(dev), return_inverse=True)  # fit the classes present only
        self.gtol = self.cfg.tol * start_gradient(self.xtr, self.ytr, len(self.classes))  # the same for every C
        ctx.log(gradient_tol=self.gtol)
        scores = self.sweep(ctx)  # {C: fit and validation accuracy}
        for r in scores.values():
            ctx.log(C=r["C"], val_acc=r["acc"], n_iter=r["n_iter"], converged=r["converged"])
        best = max(scores.values(), key=lambda r: r["acc"])  # (max keeps the first of equals: the path's order)
        ctx.log(selected_C=best["C"], val_acc=best["acc"])
        self._set(self.classes.cpu(), best["theta"][:, :-1], best["theta"][:, -1])

    def fit_c(self, c: float, init) -> dict:
        """The probe at inverse regularisation ``c`` fitted on the training features (from ``init``, a
        warm start, or the cold start), and its validation accuracy."""
        r = fit_logreg(self.xtr, self.ytr, len(self.classes), c, init=None if init is None else init.to(self.device),
                       max_iter=self.cfg.max_iter, tol=self.gtol)
        # (N,) the first of equal scores, as sklearn's predict
        pred = self.classes[(self.xva @ r.weight.T + r.bias).argmax(dim=1)]
        return {"C": c, "acc": float((pred == self.yva).double().mean().item() * 100), "theta": r.theta.cpu(),
                "n_iter": r.n_iter, "converged": r.converged}

    # ----------------------------------------------------------------- the sweep's speed-ups
    def sweep(self, ctx) -> dict:
        """{C: result} of the C values fitted: the path, then the refinement around its best."""
        fitted = self._path(self.fit_c, ctx)
        return fitted | self._refine(self.fit_c, fitted, ctx)

    def _path(self, fit_one, ctx) -> dict:
        """The 13 path values in increasing order, each fit from the previous solution, until the
        patience runs out; returns {C: result} of the fitted ones (the skipped ones are logged)."""
        cfg = self.cfg
        coarse = [float(c) for c in np.logspace(np.log10(cfg.c_min), np.log10(cfg.c_max), 13)]

        def path_fit(c: float, done: dict) -> dict:
            if out_of_patience(done, cfg.patience):
                return {"C": c, "skipped": True}
            fitted = [r for r in done.values() if not r.get("skipped")]
            return fit_one(c, fitted[-1]["theta"] if fitted else None)

        path = ctx.units(f"{SOLVER}:path", coarse, path_fit, desc="linear probe: C path")
        skipped = [c for c, r in path.items() if r.get("skipped")]
        if skipped:
            ctx.log(skipped_C=skipped, patience=cfg.patience)
        return {c: r for c, r in path.items() if not r.get("skipped")}

    def _refine(self, fit_one, fitted: dict, ctx) -> dict:
        """``refine_steps`` values over the decade on each side of the path's best, as two paths
        leaving it; returns {C: result} in increasing C."""
        center = max(fitted, key=lambda c: fitted[c]["acc"])  # (max keeps the first of equals: the smallest C)
        fine = [
            float(c) for c in np.logspace(np.log10(center) - 1, np.log10(center) + 1, self.cfg.refine_steps + 2)[1:-1]
        ]
        fine = [c for c in fine if c not in fitted]

        def refine_fit(c: float, done: dict) -> dict:
            start = refine_start(c, center, fine)
            return fit_one(c, fitted[center]["theta"] if start is None else done[start]["theta"])

        refine = ctx.units(f"{SOLVER}:refine", refine_order(center, fine), refine_fit, desc="linear probe: refine")
        return {c: refine[c] for c in sorted(refine)}

    def _set(self, classes: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor):
        """The probe's weights over the classes present in the source data: coef (K, D) and
        intercept (K,) of the classes ``classes`` (K,) (indices into the class names)."""
        w = torch.zeros_like(self.weight)
        b = torch.zeros_like(self.bias)
        classes = classes.to(torch.long)
        w[classes], b[classes] = coef.to("cpu", torch.float32), intercept.to("cpu", torch.float32)
        missing = torch.ones(len(b), dtype=torch.bool)  # classes absent from the source data can never win
        missing[classes] = False
        b[missing] = -1e4
        self.weight, self.bias = w, b

    @torch.no_grad()
    def logits(self, x):
        return x.float().cpu() @ self.weight.T + self.bias  # (B, D) @ (D, C) + (C,)

    def state_dict(self):
        return {"weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state):
        self.weight, self.bias = state["weight"], state["bias"]
