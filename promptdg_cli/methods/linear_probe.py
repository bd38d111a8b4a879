"""Linear probe (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, Sec. 3.2, https://arxiv.org/abs/2103.00020).

A multinomial logistic regression (L-BFGS, L2-regularised) on frozen, cached CLIP image features of
the labelled source images. The inverse regularisation strength C is chosen on the source
validation split, never on the target.

Resume: a checkpoint after every fitted C (its validation accuracy, and the weights of the best fit
so far); a preemption signal stops the sweep after the fit in progress. torchrun: the C values are
shared out over the ranks (rank r fits every world-th value), the accuracies and the best weights
gathered on every rank; the fits are deterministic, so the result is a single process's.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from ..schema import MethodConfig
from .base import Method


@dataclass
class LinearProbeConfig(MethodConfig):
    name: str = "linear_probe"
    # CLIP sweeps C over 1e-6..1e6 with 96 log-spaced values; we sweep 13 (one per decade) and then
    # 8 values around the best decade, which reaches the same optimum at a fraction of the fits.
    c_min: float = 1.0e-6
    c_max: float = 1.0e6
    refine_steps: int = 8
    max_iter: int = 1000  # CLIP's value


class LinearProbe(Method):
    Config = LinearProbeConfig

    def __init__(self, cfg, backbone, classnames, device):
        super().__init__(cfg, backbone, classnames, device)
        self.weight = torch.zeros(len(classnames), backbone.embed_dim)  # (C, D)
        self.bias = torch.zeros(len(classnames))  # (C,)

    def fit(self, data, ctx):
        xtr, ytr = data["train"].x.numpy(), data["train"].y.numpy()
        xva, yva = data["val"].x.numpy(), data["val"].y.numpy()

        def fit_one(c: float) -> dict:
            # C as a NumPy float64, as np.logspace gives it: under NumPy 2's promotion rules a Python
            # float would let sklearn compute parts of a float32 problem in float32 (other results)
            clf = LogisticRegression(C=np.float64(c), max_iter=self.cfg.max_iter, random_state=ctx.seed)
            with warnings.catch_warnings():
                # weakly regularised fits (large C) may stop at max_iter; they are still valid candidates
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(xtr, ytr)
            return {"C": c, "acc": float((clf.predict(xva) == yva).mean() * 100), "classes": torch.as_tensor(clf.classes_),
                    "coef": torch.as_tensor(clf.coef_), "intercept": torch.as_tensor(clf.intercept_)}

        state = ctx.load_checkpoint() or {}
        scores = {float(c): float(a) for c, a in state.get("scores", [])}  # C -> val accuracy, in fitting order
        best = state.get("best")  # the first fit of the highest accuracy so far, with its weights

        def sweep(values, desc: str) -> None:
            nonlocal best
            todo = [float(c) for c in values if float(c) not in scores]
            rounds = range(0, len(todo), ctx.world)  # one C per rank and round
            for r in ctx.progress(rounds, desc=desc):
                mine = [fit_one(c) for c in ctx.shard(todo[r : r + ctx.world])]
                for res in (res for part in ctx.all_gather(mine) for res in part):  # in C order
                    scores[res["C"]] = res["acc"]
                    ctx.log(C=res["C"], val_acc=res["acc"])
                    if best is None or res["acc"] > best["acc"]:
                        best = res
                ctx.save_checkpoint({"scores": [[c, a] for c, a in scores.items()], "best": best})

        coarse = [float(c) for c in np.logspace(np.log10(self.cfg.c_min), np.log10(self.cfg.c_max), 13)]
        sweep(coarse, "linear probe: C sweep")
        center = max(coarse, key=lambda c: scores[c])
        sweep(np.logspace(np.log10(center) - 1, np.log10(center) + 1, self.cfg.refine_steps + 2)[1:-1], "linear probe: refine")
        ctx.log(selected_C=best["C"], val_acc=best["acc"])
        self._set(best["classes"], best["coef"], best["intercept"])

    def _set(self, classes: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor):
        """The weights of a fitted sklearn LogisticRegression (classes_, coef_, intercept_)."""
        w = torch.zeros_like(self.weight)
        b = torch.zeros_like(self.bias)
        classes = classes.to(torch.long)
        if coef.shape[0] == 1:  # sklearn's binary case: one row for class 1
            coef = torch.cat([-coef, coef]) / 2
            intercept = torch.cat([-intercept, intercept]) / 2
        coef, icpt = coef.to(torch.float32), intercept.to(torch.float32)
        w[classes], b[classes] = coef, icpt
        # classes absent from the source data can never win
        missing = torch.ones(len(b), dtype=torch.bool)
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
