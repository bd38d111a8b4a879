"""Dassl's learning-rate schedule and batching, as the official CoOp, DAPL and DAPT code runs them."""
import math

import pytest
import torch

from promptdg_cli.training import dassl_lr as warmup_cosine_lr
from promptdg_cli.training import order_batches


def test_constant_warmup_then_cosine_recounted_from_zero():
    """build_lr_scheduler: CosineAnnealingLR(T_max=epochs) behind ConstantWarmupScheduler(1 epoch, 1e-5)
    with WARMUP_RECOUNT=True: the cosine's count starts at 0 after the warm-up, so epoch 1 runs at the
    full rate and epoch e >= 1 at lr (1 + cos(pi (e - 1) / T)) / 2."""
    lr, epochs = 0.002, 50
    got = [warmup_cosine_lr(e, lr, epochs, 1, 1e-5) for e in range(epochs)]
    assert got[0] == 1e-5 and got[1] == pytest.approx(lr)
    assert got[2] == pytest.approx(lr * (1 + math.cos(math.pi / 50)) / 2)
    assert got[-1] == pytest.approx(lr * (1 + math.cos(math.pi * 48 / 50)) / 2) and got[-1] > 0


def test_the_same_rates_as_pytorch_schedulers_chained_like_dassl():
    """Independent of the formula: PyTorch's own CosineAnnealingLR driven as Dassl's wrapper drives it."""
    import torch

    lr, epochs = 0.003, 25
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs))
    rates = [1e-5]  # step 0: the warm-up rate
    for g in opt.param_groups:
        g["lr"] = 1e-5
    rates.append(cosine.get_last_lr()[0])  # step 1: the successor's rate at its epoch 0
    for g in opt.param_groups:
        g["lr"] = cosine.get_last_lr()[0]
    for _ in range(2, 120):  # then the successor steps (past T_max it continues periodically)
        opt.step()  # (no gradient: nothing moves; keeps PyTorch's call order)
        cosine.step()
        rates.append(opt.param_groups[0]["lr"])
    ours = [warmup_cosine_lr(k, lr, epochs, 1, 1e-5, "linear") for k in range(120)]
    assert ours == pytest.approx(rates, rel=1e-9, abs=1e-15)


def test_last_incomplete_batch_is_dropped_like_dassl():
    def sizes(n, drop_last=True):
        return [len(b) for b in order_batches(torch.arange(n), 32, drop_last)]

    assert sizes(100) == [32, 32, 32]  # 96 images seen, 4 dropped
    assert sizes(96) == [32, 32, 32]
    assert sizes(20) == [20]  # fewer than one batch: nothing is dropped
    assert sizes(100, drop_last=False) == [32, 32, 32, 4]
