"""Tolerances of float comparisons, derived from the computation that is compared.

Two float32 evaluations of one quantity that add in different orders agree only up to rounding:
PyTorch's, MKL's and oneDNN's AVX-512, AVX2 and plain kernels split their sums differently, the
shared-prefix text path adds in another order than the 77-position one, two ranks add their halves
before the all-reduce. A sum of n float32 terms is within ``gamma(n) * sum(|terms|)`` of the exact
sum, ``gamma(n) = n u / (1 - n u)`` with the unit roundoff ``u = 2**-24`` (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., Lemma 3.1 and eq. 3.5). Through a chain of ``depth``
such reductions (the layers of a network) the relative error grows, to first order, to
``depth * gamma(n)``. Each test names the longest reduction of its computation (n), how many of
them follow one another (depth) and the magnitude the error scales with (the value itself, or the
largest gradient times the learning rate for a parameter after one step).

These are worst-case bounds: differences seen between CPU kinds are 10 to 100 times smaller, so a
tolerance from them does not fail a correct result on another machine, and it still fails a wrong
loss or gradient, whose error has the size of the value itself.

The tests marked ``numerics`` run again as other CPU kinds sum (``make test-cpu-kinds``, the Makefile's
``AVX2_ENV`` and ``DEFAULT_ENV``): ``ATEN_CPU_CAPABILITY`` alone changes only PyTorch's own kernels;
MKL (matrix products) and oneDNN (convolutions, some matrix products) pick their code path by
``MKL_ENABLE_INSTRUCTIONS`` and ``ONEDNN_MAX_CPU_ISA``. With the three set to AVX2 an AVX-512
machine prints what a 2-core AMD EPYC (AVX2) prints, bit for bit (the DAPL step's target loss:
1.3290036916732788 on both, 1.3290021419525146 with the machine's own AVX-512 kernels).
"""
from __future__ import annotations

import torch

U32 = 2.0 ** -24  # float32's unit roundoff

# The demo CLIP's widest reduction: the MLP's down-projection sums 4 x width = 512 products; its
# text and image towers have 4 residual blocks of 2 reductions each (attention, MLP).
DEMO_CLIP_N = 4 * 128
DEMO_CLIP_DEPTH = 2 * 4


def gamma(n: int, u: float = U32) -> float:
    """Higham's bound on the relative error of a sum of n terms in a format of unit roundoff u."""
    if n * u >= 1:
        raise ValueError(f"gamma({n}) is unbounded for u={u}")
    return n * u / (1 - n * u)


def rel(n: int = DEMO_CLIP_N, depth: int = DEMO_CLIP_DEPTH, extra: int = 2) -> float:
    """Relative tolerance of a value computed through ``depth`` reductions of at most n terms, plus
    ``extra`` reductions after them (a projection, the logits, a loss)."""
    return (depth + extra) * gamma(n)


def value_tol(value: float, **kw) -> float:
    """Absolute tolerance of a scalar (a loss): its magnitude times :func:`rel`."""
    return abs(float(value)) * rel(**kw) + gamma(2)


def step_tol(lr: float, grad: torch.Tensor, param: torch.Tensor | None = None, **kw) -> float:
    """Absolute tolerance of a parameter after one step ``p - lr * (g + ...)``: the gradient's error
    (its largest entry times :func:`rel`) scaled by the learning rate, plus the rounding of the update."""
    tol = float(lr) * float(grad.abs().max()) * rel(**kw)
    if param is not None:
        tol += gamma(3) * float(param.abs().max())
    return tol


def adam_first_step_tol(lr: float, grad: torch.Tensor, param: torch.Tensor, eps: float = 1e-8, param_rel: float = 0.0,
                        **kw) -> torch.Tensor:
    """Per-entry tolerance of Adam's first step ``p - lr * g / (|g| + eps)`` when g is known to within
    ``delta = rel * max|g|``: the step's derivative in g is ``eps / (|g| + eps)**2``, so an entry with
    |g| > delta moves by at most ``lr * eps * delta / (|g| - delta + eps)**2``; an entry with |g| <= delta
    may take either sign (up to 2 lr apart). Plus the rounding of the update (Adam's bias corrections,
    square root and division: 8 roundings of a value of size lr; the sum: one of size |p| + lr) and
    ``param_rel`` times the parameter's largest entry where the starting value itself was computed (a
    head initialised from text features: an entry's error scales with its feature's norm, not itself)."""
    delta = float(grad.abs().max()) * rel(**kw)
    g = grad.abs()
    sure = lr * eps * delta / (g - delta + eps).clamp_min(eps) ** 2
    rounding = gamma(8) * lr + gamma(1) * (param.abs() + lr)
    return torch.where(g > delta, sure, torch.full_like(g, 2 * lr)) + rounding + param_rel * float(param.abs().max())
