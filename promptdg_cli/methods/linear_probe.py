"""Linear probe (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, Sec. 3.2, https://arxiv.org/abs/2103.00020).

A multinomial logistic regression (L-BFGS, L2-regularised) on frozen, cached CLIP image features of
the labelled source images. The inverse regularisation strength C is chosen on the source
validation split, never on the target.
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

        def val_accuracy(c: float) -> tuple[float, LogisticRegression]:
            clf = LogisticRegression(C=c, max_iter=self.cfg.max_iter, random_state=ctx.seed)
            with warnings.catch_warnings():
                # weakly regularised fits (large C) may stop at max_iter; they are still valid candidates
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(xtr, ytr)
            return float((clf.predict(xva) == yva).mean() * 100), clf

        coarse = np.logspace(np.log10(self.cfg.c_min), np.log10(self.cfg.c_max), 13)
        scores = {}
        for c in ctx.progress(coarse, desc="linear probe: C sweep"):
            scores[c] = val_accuracy(c)
            ctx.log(C=float(c), val_acc=scores[c][0])
        best = max(scores, key=lambda c: scores[c][0])
        for c in np.logspace(np.log10(best) - 1, np.log10(best) + 1, self.cfg.refine_steps + 2)[1:-1]:
            scores[c] = val_accuracy(c)
            ctx.log(C=float(c), val_acc=scores[c][0])
        best = max(scores, key=lambda c: scores[c][0])
        clf = scores[best][1]
        ctx.log(selected_C=float(best), val_acc=scores[best][0])
        self._set(clf)

    def _set(self, clf: LogisticRegression):
        w = torch.zeros_like(self.weight)
        b = torch.zeros_like(self.bias)
        classes = torch.as_tensor(clf.classes_, dtype=torch.long)
        coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
        if coef.shape[0] == 1:  # sklearn's binary case: one row for class 1
            coef = torch.cat([-coef, coef]) / 2
            icpt = torch.as_tensor(np.r_[-clf.intercept_, clf.intercept_] / 2, dtype=torch.float32)
        else:
            icpt = torch.as_tensor(clf.intercept_, dtype=torch.float32)
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
