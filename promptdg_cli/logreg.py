"""Multinomial L2 logistic regression fitted with full-batch L-BFGS in torch (the linear probe's solver).

The objective is scikit-learn's ``LogisticRegression(solver="lbfgs")`` objective for more than two
classes, with an unpenalised intercept:

    C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||_F^2,

minimised, as scikit-learn 1.9 does it (``_logistic_regression_path``: ``l2_reg_strength =
1 / (C * sw_sum)`` with ``sw_sum = n`` without sample weights, and ``LinearModelLoss``), in the form
divided by C * n:

    f(W, b) = mean_i CE(W x_i + b, y_i) + ||W||_F^2 / (2 C n).

The minimiser is the same; the division keeps f and its gradient on the scale of a mean loss for
every C, so that one gradient tolerance (``tol``, scikit-learn's default 1e-4, its ``gtol`` on the
max-abs gradient of f) means the same across the sweep. The loss change tolerance is
scikit-learn's ``ftol`` (64 machine epsilons of float64); torch's L-BFGS compares it with the
absolute change of f, scikit-learn with the change relative to max(|f|, 1), the same while f <= 1.

The gradient is written out (no autograd): with P = softmax(X W^T + b) and Y the one-hot labels,
dW = (P - Y)^T X / n + W / (C n), db = sum_i (P - Y)_i / n. Rows are processed in chunks so the
(rows, classes) buffer stays bounded on DomainNet-size problems.

Warm starts: ``fit_path`` fits increasing C values, each from the solution of the previous one (a
regularisation path); each fit converges to the same unique minimiser as a cold start, in fewer
iterations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

FTOL = 64 * torch.finfo(torch.float64).eps  # scikit-learn's L-BFGS-B ftol
CHUNK_ELEMENTS = 1 << 24  # rows x classes per chunk of the loss/gradient computation


@dataclass
class LogRegFit:
    """One fit: ``weight`` (K, D) and ``bias`` (K,) in the dtype and on the device of the data."""

    c: float
    weight: torch.Tensor
    bias: torch.Tensor
    n_iter: int  # L-BFGS iterations
    n_eval: int  # objective evaluations (line search included)
    objective: float  # f at the solution (the C*n-scaled objective)
    grad_max: float  # max-abs gradient of f at the solution
    converged: bool  # grad_max <= tol

    @property
    def theta(self) -> torch.Tensor:
        """[W | b] as one (K, D + 1) tensor: the warm start of the next fit."""
        return torch.cat([self.weight, self.bias[:, None]], dim=1)


def objective_and_grad(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: float):
    """f(W, b) (a float64 scalar tensor) and its gradient (like theta) for theta = [W | b] (K, D+1),
    x (n, D), y (n,) class indices in [0, K)."""
    n, d = x.shape
    k = theta.shape[0]
    w, b = theta[:, :d], theta[:, d]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    grad = torch.zeros_like(theta)
    chunk = max(1, CHUNK_ELEMENTS // max(k, 1))
    for i in range(0, n, chunk):
        xs, ys = x[i : i + chunk], y[i : i + chunk]
        z = torch.addmm(b, xs, w.T)  # (B, K)
        lse = torch.logsumexp(z, dim=1)  # (B,)
        total += (lse - z.gather(1, ys[:, None]).squeeze(1)).sum(dtype=torch.float64)
        p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        p[torch.arange(len(ys), device=x.device), ys] -= 1  # P - Y
        grad[:, :d].addmm_(p.T, xs)
        grad[:, d] += p.sum(dim=0)
    reg = 1.0 / (c * n)
    f = total / n + 0.5 * reg * w.double().pow(2).sum()
    grad.div_(n)
    grad[:, :d].add_(w, alpha=reg)
    return f, grad


def cold_start(y: torch.Tensor, n_classes: int, dim: int, dtype=torch.float64) -> torch.Tensor:
    """[W | b] = [0 | log class frequency, centred]: at W = 0 the minimiser over the unpenalised b
    (softmax(b) = the class frequencies), summing to 0 over the classes as scikit-learn's intercepts
    do (its L-BFGS starts from zeros and every gradient in b sums to 0). Starting here rather than
    at zero spares the optimiser the ill-conditioning between b and a strongly penalised W (small C)."""
    logf = torch.bincount(y, minlength=n_classes).to(dtype).log()  # (K,) every class occurs (y from unique)
    theta = torch.zeros(n_classes, dim + 1, dtype=dtype, device=y.device)
    theta[:, dim] = logf - logf.mean()
    return theta


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float, init: Optional[torch.Tensor] = None,
               max_iter: int = 1000, tol: float = 1e-4, ftol: float = FTOL, history_size: int = 100) -> LogRegFit:
    """Minimise f for one C with full-batch L-BFGS (strong-Wolfe line search) on x's device and dtype.

    x: (n, D) float features; y: (n,) long class indices in [0, n_classes), each present; init:
    (n_classes, D + 1) [W | b] to start from (a warm start), ``cold_start`` if None. Stops when the
    max-abs gradient of f is at most ``tol``, when f (or the step) changes by less than ``ftol`` or after ``max_iter``
    iterations (``2 * max_iter`` evaluations at most). ``history_size``: the L-BFGS memory (torch's
    default; SciPy's is 10): on the ill-conditioned fits of large C it saves more iterations than
    its two-loop recursion costs (2 * history_size * K * (D + 1) flops, small next to an evaluation)."""
    if not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float tensor of features, got dtype {x.dtype} and shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must hold one label per row of x ({x.shape[0]}), got shape {tuple(y.shape)}")
    if not c > 0:
        raise ValueError(f"C must be > 0, got {c}")
    shape = (n_classes, x.shape[1] + 1)
    theta = cold_start(y, n_classes, x.shape[1], x.dtype) if init is None else init.to(x).clone()
    if theta.shape != shape:
        raise ValueError(f"init must have shape {shape} ([W | b]), got {tuple(theta.shape)}")
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=ftol, history_size=history_size, line_search_fn="strong_wolfe")

    last: Dict[str, torch.Tensor] = {}  # the last point the line search evaluated: theta, f, g

    def closure():
        f, g = objective_and_grad(theta, x, y, c)
        theta.grad = g
        last.update(theta=theta.clone(), f=f, g=g)
        return f

    opt.step(closure)
    if torch.equal(theta, last["theta"]):  # the accepted point is (nearly always) the last one evaluated
        f, g = last["f"], last["g"]
    else:
        f, g = objective_and_grad(theta, x, y, c)
    state = opt.state[theta]
    d = x.shape[1]
    grad_max = float(g.abs().max())
    return LogRegFit(
        c=float(c),
        weight=theta[:, :d].clone(),
        bias=theta[:, d].clone(),
        n_iter=int(state.get("n_iter", 0)),
        n_eval=int(state.get("func_evals", 0)),
        objective=float(f),
        grad_max=grad_max,
        converged=grad_max <= tol,
    )


def fit_path(x: torch.Tensor, y: torch.Tensor, n_classes: int, cs: Sequence[float], init: Optional[torch.Tensor] = None,
             **kw) -> list[LogRegFit]:
    """``fit_logreg`` for each C of ``cs`` (increasing), each fit starting from the previous solution
    (the first from ``init``, zeros if None)."""
    if list(cs) != sorted(cs):
        raise ValueError(f"the C values of a path must increase, got {list(cs)}")
    fits = []
    for c in cs:
        fits.append(fit_logreg(x, y, n_classes, c, init=init, **kw))
        init = fits[-1].theta
    return fits
