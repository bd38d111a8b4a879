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

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from ..schema import LinearProbeConfig
from .base import Method


class LinearProbe(Method):
    Config = LinearProbeConfig

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        self.weight = torch.zeros(len(classnames), backbone.embed_dim)  # (C, D)
        self.bias = torch.zeros(len(classnames))  # (C,)

    def fit_one(self, c: float, data) -> dict:
        """One L2-regularised multinomial logistic regression at inverse strength C, scored on validation."""
        xtr, ytr = data.train.x.numpy(), data.train.y.numpy()
        # C as a NumPy float64, as np.logspace gives it: under NumPy 2's promotion rules a Python
        # float would let sklearn compute parts of a float32 problem in float32 (other results)
        clf = LogisticRegression(C=np.float64(c), max_iter=self.cfg.max_iter, random_state=self.env.seed)
        with warnings.catch_warnings():
            # weakly regularised fits (large C) may stop at max_iter; they are still valid candidates
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xtr, ytr)
        acc = float((clf.predict(data.val.x.numpy()) == data.val.y.numpy()).mean() * 100)
        return {"C": c, "acc": acc, "classes": torch.as_tensor(clf.classes_), "coef": torch.as_tensor(clf.coef_),
                "intercept": torch.as_tensor(clf.intercept_)}

    def fit(self, data, ctx):
        """C over a log grid (one value per decade), then a finer grid around the best, selected on
        source validation; the first fit of the highest accuracy wins."""
        cfg = self.cfg
        fit = lambda c, done: self.fit_one(c, data)  # noqa: E731
        coarse = [float(c) for c in np.logspace(np.log10(cfg.c_min), np.log10(cfg.c_max), 13)]
        scores = ctx.units("C", coarse, fit, desc="linear probe: C sweep")
        center = max(coarse, key=lambda c: scores[c]["acc"])
        fine = [float(c) for c in np.logspace(np.log10(center) - 1, np.log10(center) + 1, cfg.refine_steps + 2)[1:-1]]
        fine = [c for c in fine if c not in scores]
        scores |= ctx.units("C-refine", fine, fit, desc="linear probe: refine")
        best = max(scores.values(), key=lambda r: r["acc"])  # (max keeps the first of equals: the coarse grid's order)
        for r in scores.values():
            ctx.log(C=r["C"], val_acc=r["acc"])
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
