"""The linear probe's torch L-BFGS solver (promptdg_cli/logreg.py) and its sweep (methods/linear_probe.py).

Reference values are computed independently: the objective C * sum_i CE_i + 0.5 * ||W||^2 and its
gradient are written out below in NumPy, and scikit-learn's LogisticRegression (the solver the
probe replaces) fits the same problems. Tolerances are stated where they are used.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression

from promptdg_cli.data import Features
from promptdg_cli.logreg import fit_logreg, fit_path
from promptdg_cli.methods.linear_probe import LinearProbe, out_of_patience, refine_order, refine_start
from promptdg_cli.protocols import TrainData
from promptdg_cli.schema import LinearProbeConfig
from promptdg_cli.training import TrainContext

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

def problem(n=300, d=16, k=4, sep=0.6, seed=0):
    """Overlapping classes (not separable: the minimiser is finite for every C), normalised features."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=g)
    y = torch.randint(k, (n,), generator=g)
    x = torch.nn.functional.normalize(mu[y] * sep + torch.randn(n, d, generator=g), dim=1)
    return x.double(), y


def sk_objective(w, b, x, y, c) -> float:
    """C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||_F^2 (scikit-learn's LogisticRegression objective)."""
    z = x @ w.T + b
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return c * float((lse - z[np.arange(len(y)), y]).sum()) + 0.5 * float((w * w).sum())


def sk_gradient(w, b, x, y, c):
    """d/dW = C (P - Y)^T X + W, d/db = C sum_i (P - Y)_i, with P the softmax, Y the one-hot labels."""
    z = x @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return c * p.T @ x + w, c * p.sum(axis=0)


@pytest.mark.parametrize("c", [1e-2, 1.0, 100.0])
def test_gradient_of_the_objective_written_out_is_zero_at_the_solution(c):
    x, y = problem()
    # the gradient criterion alone (no loss-change stop); 1e-8 is about where float64 stops resolving f
    fit = fit_logreg(x, y, 4, c, tol=1e-8, ftol=0.0, max_iter=5000)
    w, b = fit.weight.numpy(), fit.bias.numpy()
    gw, gb = sk_gradient(w, b, x.numpy(), y.numpy(), c)
    n = len(y)
    # the solver stops at max-abs gradient 1e-8 of the objective divided by C*n
    assert fit.converged
    assert np.abs(gw).max() / (c * n) <= 1.001e-8 and np.abs(gb).max() / (c * n) <= 1.001e-8
    # and its reported objective is that objective divided by C*n
    assert fit.objective == pytest.approx(sk_objective(w, b, x.numpy(), y.numpy(), c) / (c * n), rel=1e-12)
    # not a trivial solution: the gradient at W = 0 is far from 0
    g0, _ = sk_gradient(np.zeros_like(w), np.zeros_like(b), x.numpy(), y.numpy(), c)
    assert np.abs(g0).max() / (c * n) > 1e-3


@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0, 1000.0])
def test_objective_at_the_solution_is_not_above_sklearns(c):
    x, y = problem(seed=1)
    xn, yn = x.numpy(), y.numpy()
    clf = LogisticRegression(C=np.float64(c), tol=1e-10, max_iter=20000).fit(xn, yn)
    ref = sk_objective(clf.coef_, clf.intercept_, xn, yn, c)
    fit = fit_logreg(x, y, 4, c, tol=1e-8, ftol=0.0, max_iter=5000)
    mine = sk_objective(fit.weight.numpy(), fit.bias.numpy(), xn, yn, c)
    assert mine <= ref * (1 + 1e-10), (mine, ref)
    # the same minimiser (strictly convex in W; both intercepts sum to 0 over the classes), as far as
    # scikit-learn's own stop (its ftol, ~1e-8 gradient) pins it: |W - W*| <= |gradient| * C * n
    np.testing.assert_allclose(fit.weight.numpy(), clf.coef_, atol=1e-4 * max(1.0, np.abs(clf.coef_).max()))
    np.testing.assert_allclose(fit.bias.numpy(), clf.intercept_, atol=1e-4 * max(1.0, np.abs(clf.intercept_).max()))


def test_validation_predictions_agree_with_sklearn_at_default_settings():
    """At the probe's settings (tol 1e-4, max_iter 1000; the former sklearn sweep's): the same
    accuracy within 0.5 points and at least 99% identical predictions on held-out data, for every C."""
    x, y = problem(n=1200, d=32, k=6, sep=0.5, seed=2)
    xtr, ytr, xva, yva = x[:900], y[:900], x[900:], y[900:]
    for c in [1e-4, 1e-2, 1.0, 100.0, 1e4]:
        clf = LogisticRegression(C=np.float64(c), max_iter=1000).fit(xtr.numpy(), ytr.numpy())
        fit = fit_logreg(xtr, ytr, 6, c)
        pred = (xva @ fit.weight.T + fit.bias).argmax(1).numpy()
        ref = clf.predict(xva.numpy())
        acc, acc_ref = (pred == yva.numpy()).mean() * 100, (ref == yva.numpy()).mean() * 100
        assert abs(acc - acc_ref) <= 0.5, (c, acc, acc_ref)
        assert (pred == ref).mean() >= 0.99, c


def test_warm_started_path_reaches_the_cold_start_solutions_in_fewer_iterations():
    x, y = problem(seed=3)
    cs = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
    tol, n, p = 5e-8, len(y), 4 * 17  # (1e-8 is about where float64 stops resolving f)
    warm = fit_path(x, y, 4, cs, tol=tol, ftol=0.0, max_iter=5000)
    cold = [fit_logreg(x, y, 4, c, tol=tol, ftol=0.0, max_iter=5000) for c in cs]
    for c, a, b in zip(cs, warm, cold):
        assert a.converged and b.converged
        # f is strongly convex in W with modulus mu = 1/(C n): each fit lies within |grad|_2 / mu <=
        # sqrt(p) tol C n of the minimiser, and its f within |grad|_2^2 / (2 mu) of the minimum
        assert (a.weight - b.weight).abs().max() <= 2 * p**0.5 * tol * c * n
        assert abs(a.objective - b.objective) <= p * tol**2 * c * n
    # not vacuous: the solutions move along the path
    assert (warm[-1].weight - warm[-2].weight).abs().max() > 100 * 2 * p**0.5 * tol * cs[-2] * n
    assert sum(a.n_iter for a in warm) < sum(b.n_iter for b in cold)
    with pytest.raises(ValueError, match="must increase"):
        fit_path(x, y, 4, [1.0, 0.1])


def test_bad_input_is_named():
    x, y = problem()
    with pytest.raises(ValueError, match="C must be > 0, got 0"):
        fit_logreg(x, y, 4, 0.0)
    with pytest.raises(ValueError, match=r"init must have shape \(4, 17\)"):
        fit_logreg(x, y, 4, 1.0, init=torch.zeros(4, 16))
    with pytest.raises(ValueError, match="one label per row"):
        fit_logreg(x, y[:-1], 4, 1.0)


def test_refinement_values_form_two_paths_leaving_the_best_value():
    center = 1.0
    fine = [10 ** -0.6, 10 ** -0.2, 10 ** 0.2, 10 ** 0.6]
    assert refine_order(center, fine) == [10 ** 0.2, 10 ** 0.6, 10 ** -0.2, 10 ** -0.6]
    assert refine_start(10 ** 0.2, center, fine) is None  # next to the path's best: its solution
    assert refine_start(10 ** 0.6, center, fine) == 10 ** 0.2
    assert refine_start(10 ** -0.2, center, fine) is None
    assert refine_start(10 ** -0.6, center, fine) == 10 ** -0.2
    # every start comes before its fit in the order
    order = refine_order(center, fine)
    assert all(refine_start(c, center, fine) in (None, *order[:i]) for i, c in enumerate(order))


def test_patience_counts_values_without_a_higher_accuracy():
    done = lambda *accs: {float(i): {"acc": a} for i, a in enumerate(accs)}  # noqa: E731
    assert not out_of_patience(done(10, 50, 40, 40), 3)  # only 2 values after the best
    assert out_of_patience(done(10, 50, 40, 40, 50), 3)  # equal to the best is no gain
    assert not out_of_patience(done(10, 50, 40, 40, 51), 3)
    assert not out_of_patience(done(10, 50, 40, 40, 30, 20), None)  # None: never
    assert out_of_patience(done(10, 60, 50, 40), 2)
    assert not out_of_patience(done(10, 60, 50), 2)  # one value after the best
    assert not out_of_patience(done(10, 10, 10, 10), 3)  # the flat start (majority class) is no peak
    assert not out_of_patience(done(60, 50, 40), 2)  # nor is the first value
    # skipped values do not count
    d = done(10, 50, 40) | {3.0: {"skipped": True}}
    assert not out_of_patience(d, 3)


# ----------------------------------------------------------------------------- the probe's sweep
def _probe(tmp_path, n_names=5, **cfg):
    values = {"name": "linear_probe", "c_min": 1e-3, "c_max": 1e3, "refine_steps": 4, "max_iter": 1000, "tol": 1e-3,
              "patience": None, **cfg}
    conf = OmegaConf.structured(LinearProbeConfig(**values))
    probe = LinearProbe(conf, SimpleNamespace(embed_dim=16), [f"c{i}" for i in range(n_names)], torch.device("cpu"))
    (tmp_path / "split").mkdir(parents=True, exist_ok=True)
    return probe, TrainContext(tmp_path, tmp_path / "split", "t", 0, torch.device("cpu"))


def _data(present=(0, 2, 3)):
    x, y = problem(n=400, d=16, k=len(present), seed=4)
    y = torch.tensor(present)[y]  # the source holds some of the class names only
    f = lambda a, b: Features(x[a:b].float(), y[a:b], ["d"] * (b - a), [""] * (b - a))  # noqa: E731
    return TrainData(train=f(0, 300), val=f(300, 400))


def test_probe_selects_on_validation_and_absent_classes_never_win(tmp_path):
    probe, ctx = _probe(tmp_path)
    data = _data()
    probe.fit(data, ctx)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fits = [l for l in lines if "C" in l]
    assert len(fits) == 13 + 4  # the path, then 4 refinement values (none of them on the path)
    assert [l["C"] for l in fits[:13]] == pytest.approx(np.logspace(-3, 3, 13).tolist())
    best = max(fits, key=lambda l: l["val_acc"])  # the first of the highest accuracy
    assert lines[-1]["selected_C"] == best["C"] and lines[-1]["val_acc"] == best["val_acc"]
    assert probe.bias[[1, 4]].tolist() == [-1e4, -1e4] and (probe.weight[[1, 4]] == 0).all()
    # the gradient tolerance: tol (1e-3) x the max-abs gradient of the objective / (C n) at the cold
    # start W = 0, b = log class frequencies (centred), where the gradient in b vanishes
    xtr, ytr = data.train.x.double().numpy(), data.train.y.numpy()
    ytr_k = np.searchsorted([0, 2, 3], ytr)
    b0 = np.log(np.bincount(ytr_k))
    g0w, g0b = sk_gradient(np.zeros((3, 16)), b0 - b0.mean(), xtr, ytr_k, 1.0)
    assert np.abs(g0b).max() < 1e-12
    gtol = 1e-3 * np.abs(g0w).max() / len(ytr)
    assert lines[0]["gradient_tol"] == pytest.approx(gtol, rel=1e-6)
    assert all(l["converged"] for l in fits)  # every fit reached it (an easy problem)
    # the kept weights are scikit-learn's fit at the selected C (the same objective and gradient tolerance)
    clf = LogisticRegression(C=np.float64(best["C"]), tol=gtol, max_iter=1000).fit(xtr, ytr)
    xva = data.val.x
    pred = probe.logits(xva).argmax(1).numpy()
    assert (pred == clf.predict(xva.double().numpy())).mean() >= 0.99
    assert (pred == data.val.y.numpy()).mean() * 100 == pytest.approx(best["val_acc"], abs=1e-9)


def test_a_checkpoint_of_another_solver_is_ignored(tmp_path):
    probe, ctx = _probe(tmp_path)
    ctx._save("units:C", {"results": {1e-3: {"C": 1e-3, "acc": 99.0}}})  # the former scikit-learn sweep's section
    old = {"C": 1e-3, "acc": 99.0, "theta": torch.zeros(3, 17, dtype=torch.float64), "n_iter": 1, "converged": True}
    ctx._save("units:lbfgs-torch:path", {"results": {1e-3: old}})  # the former float64 torch sweep's
    probe.fit(_data(), ctx)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["C"] for l in lines if "C" in l][0] == pytest.approx(1e-3)  # refitted, not taken from the checkpoint
    assert lines[-1]["val_acc"] < 99.0


def test_a_sweep_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    whole, ctx = _probe(tmp_path / "whole")
    whole.fit(_data(), ctx)
    state = torch.load(tmp_path / "whole" / "split" / "checkpoint.pt", weights_only=False)
    path = state["units:lbfgs-torch-f32:path"]["results"]
    assert len(path) == 13 and len(state["units:lbfgs-torch-f32:refine"]["results"]) == 4
    # stopped after the path's 5th fit: the remaining path fits start from the 5th's stored solution
    cut = {"units:lbfgs-torch-f32:path": {"results": dict(list(path.items())[:5])}}
    resumed, ctx = _probe(tmp_path / "cut")
    torch.save(cut, tmp_path / "cut" / "split" / "checkpoint.pt")
    resumed.fit(_data(), ctx)
    lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
    assert sum("C" in l for l in lines) == 13 + 4


def test_patience_stops_the_path_where_the_full_path_stops_improving(tmp_path):
    full, ctx = _probe(tmp_path / "full", refine_steps=0)
    full.fit(_data(), ctx)
    accs = [
        json.loads(l)["val_acc"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"C"' in l
    ]
    assert len(accs) == 13
    # by hand: the first prefix whose last 2 accuracies are not above the best before them
    stop = next(i for i in range(3, 14) if accs[0] < max(accs[: i - 2]) >= max(accs[i - 2 : i]))
    assert stop < 13  # not vacuous: the path on this problem does stop early
    short, ctx = _probe(tmp_path / "short", refine_steps=0, patience=2)
    short.fit(_data(), ctx)
    lines = [json.loads(l) for l in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert [l["val_acc"] for l in lines if "C" in l] == accs[:stop]  # the same warm starts, the same fits
    (skipped,) = [l["skipped_C"] for l in lines if "skipped_C" in l]
    assert skipped == pytest.approx(np.logspace(-3, 3, 13)[stop:].tolist())
    assert lines[-1]["val_acc"] == max(accs)
