"""The bench's DomainBed rows (``benchmarks/bench.py --only erm,domainfusion_step``): one training step of
ERM and of DomainFusion on DomainBed's ResNet-50 (random weights), promptdg's way against a plain
implementation of the same step, checked equal (loss and every gradient, in fp32) and timed.

* ``erm``: DomainBed's ``ERM.update`` written out from DomainBed's code (algorithms.py, networks.py at
  7ab1d01: a torchvision resnet50 with ``fc`` = identity and ``train()`` re-freezing BatchNorm, an
  ``nn.Linear`` head, ``nn.Sequential``, Adam on ``network.parameters()``; the minibatches of the source
  domains concatenated, mean cross-entropy) against promptdg's ``ERM.batch_loss`` through the
  training loop's step, on the same batch and the same initial weights;
* ``domainfusion_step``: one DomainFusion step with the SD v1.5 UNet and VAE architectures (random
  weights) at 512 px: the cross-entropy of the step's draws plus latent distillation of its distilled
  draws. The plain way computes it as a straightforward implementation would: the LDM in fp32, the
  UNet outside ``no_grad`` (its output detached), one UNet call for the conditional and one for the
  unconditional prediction, the prompts encoded on every call. promptdg's way is the method's
  ``batch_loss``: the UNet under ``no_grad`` with both predictions in one call, the prompts' states
  cached, and the LDM in fp16 on a GPU (the check runs it in fp32).

Images are random tensors (the step, not the data loading, is measured).
"""
from __future__ import annotations

import copy
import hashlib
import time
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

from promptdg_cli.classifier import ClassifierBackbone, build_network
from promptdg_cli.methods.base import RunEnv
from promptdg_cli.methods.domainfusion import DomainFusion
from promptdg_cli.methods.erm import ERM

from bench_steps import TOLERANCE, Bench, _loop_step, classnames, method_config


def resnet50(device: torch.device, seed: int = 0) -> ClassifierBackbone:
    torch.manual_seed(seed)
    network, n = build_network("resnet50")
    return ClassifierBackbone(network.to(device), n, "resnet50", "random-init", 224)


class DomainBedERM(nn.Module):
    """DomainBed's ERM and ResNet featurizer as its code builds them (written from algorithms.ERM and
    networks.ResNet)."""

    def __init__(self, network: nn.Module, head: nn.Linear, hparams: dict):
        super().__init__()
        self.featurizer = network  # torchvision resnet50, fc = identity
        self.classifier = head
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = torch.optim.Adam(
            self.network.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"]
        )
        self.train()

    def train(self, mode: bool = True):  # networks.ResNet.train: freeze_bn after every mode change
        super().train(mode)
        for m in self.featurizer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def update(self, minibatches, step: bool = True) -> torch.Tensor:
        all_x = torch.cat([x for x, y in minibatches])
        all_y = torch.cat([y for x, y in minibatches])
        loss = F.cross_entropy(self.network(all_x), all_y)
        self.optimizer.zero_grad()
        loss.backward()
        if step:
            self.optimizer.step()
        return loss.detach()


def _check_and_time(b: Bench, name: str, ways: List[tuple]) -> dict:
    """``ways``: (label, named parameters {name: p}, step without the optimiser's, optimiser step). Each
    way once in fp32 (loss and gradients compared by name), then timed (its checked run on the CPU)."""
    losses, grads, first = [], [], []
    precision, b.precision = b.precision, "fp32"
    try:
        for _, params, fn, _ in ways:
            for p in params.values():
                p.grad = None
            b.sync()
            t, c = time.perf_counter(), time.process_time()
            losses.append(float(fn()))
            b.sync()
            first.append((time.perf_counter() - t, time.process_time() - c))
            grads.append({k: p.grad.detach().float().clone() for k, p in params.items()})
    finally:
        b.precision = precision
    scale = max(float(g.abs().max()) for g in grads[0].values())
    grad_diff = max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])
    loss_diff = abs(losses[0] - losses[1])
    check = {
        "loss_official": losses[0],
        "loss_promptdg": losses[1],
        "loss_abs_diff": loss_diff,
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": scale,
        "precision": "fp32",
        "parameters_compared": len(grads[0]),
        "equal": bool(
            grads[0].keys() == grads[1].keys()
            and loss_diff <= TOLERANCE[0] * max(1.0, abs(losses[0]))
            and grad_diff <= TOLERANCE[1] * scale
        ),
    }
    out = {"check": check}
    for k, (label, _, fn, opt_step) in enumerate(ways):
        # on the CPU a step takes minutes: promptdg's way is timed on its checked run, which ran second (the
        # shapes' kernels prepared by the first), and the first way once more, so that neither pays for them
        reps = b.repeats if b.device.type == "cuda" else int(k == 0)
        b.reset_peak()
        wall, cpu = b.timed(lambda fn=fn: (fn(), opt_step()), reps, cpu=True) if reps else first[k]
        out[f"{label}_s"], out[f"{label}_cpu_s"], out[f"{label}_cuda_peak_mb"] = (
            round(wall, 4),
            round(cpu, 4),
            b.peak_mb(),
        )
        out[f"{label}_timed_runs"] = reps or "the checked run"
    out["speedup"] = round(out["official_s"] / out["promptdg_s"], 2)
    out["speedup_cpu_time"] = round(out["official_cpu_s"] / out["promptdg_cpu_s"], 2)
    print(
        f"{name}: plain/official {out['official_s']:.3f} s, promptdg {out['promptdg_s']:.3f} s -> "
        f"{out['speedup']:.2f}x (CPU time {out['speedup_cpu_time']:.2f}x); loss "
        f"{losses[0]:.6f} vs {losses[1]:.6f}, max |grad diff| {grad_diff:.2e} (max |grad| {scale:.2e}): "
        f"{'equal' if check['equal'] else 'NOT EQUAL'}",
        flush=True,
    )
    return out


def _named(m) -> dict:
    return {f"featurizer.{k}": p for k, p in m.featurizer.named_parameters()} | {
        f"classifier.{k}": p for k, p in m.classifier.named_parameters()
    }


# --------------------------------------------------------------------- ERM
def erm_step(b: Bench, batch: int = 32, domains: int = 3) -> dict:
    """One ERM step on ``domains`` minibatches of ``batch`` 224-px images (PACS's 7 classes)."""
    dev, names = b.device, classnames("pacs")
    backbone = resnet50(dev)
    m = ERM(
        method_config("erm", "pacs", f"batch_size={batch}"), backbone, names, dev, RunEnv(seed=0, precision=b.precision)
    )
    n = batch * domains
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 3, 224, 224, generator=g).to(dev), torch.randint(len(names), (n,), generator=g).to(dev)
    ref = DomainBedERM(copy.deepcopy(backbone.network).requires_grad_(True), copy.deepcopy(m.classifier), m.hp).to(dev)
    m.labels = y
    idx = torch.arange(n)
    item = ((idx, idx), (idx, x, None))
    opt = m.optimizer(m.parameters_to_train())
    minibatches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(domains)]
    ref_named = {f"featurizer.network.{k}": p for k, p in ref.featurizer.named_parameters()} | {
        f"classifier.{k}": p for k, p in ref.classifier.named_parameters()}
    out = _check_and_time(b, f"ERM step ({domains} x {batch} images of 224 px, ResNet-50)", [
        ("official", ref_named, lambda: ref.update(minibatches, step=False), ref.optimizer.step),
        ("promptdg", _named(m), lambda: _loop_step(b, m, opt, item), opt.step)])
    return {
        "architecture": "torchvision resnet50 (random weights), 224 px",
        "domains": domains,
        "batch_per_domain": batch,
        "official": "DomainBed algorithms.ERM.update, written out",
        **out,
    }


# --------------------------------------------------------------------- DomainFusion
def sd15(device: torch.device, dtype: torch.dtype, px: int = 512):
    """SD v1.5's VAE and UNet architectures (diffusers' defaults are SD v1's) with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=px)
    unet = UNet2DConditionModel(sample_size=px // 8, cross_attention_dim=768)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    return vae.to(device, dtype=dtype), unet.to(device, dtype=dtype), sched


def _text_states(device) -> Callable:
    """A stand-in text encoder: fixed random (77, 768) states per prompt (CLIP ViT-L/14's shape)."""
    def encode(prompts):
        seeds = [int(hashlib.md5(p.encode()).hexdigest()[:8], 16) for p in prompts]
        return torch.stack([torch.randn(77, 768, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    return encode


def domainfusion_step(b: Bench, batch: int = 32, distilled: int = 8, domains: int = 3, px: int = 512) -> dict:
    """One DomainFusion step: ``domains`` + 1 (synthetic) minibatches of ``batch`` 224-px images, ``distilled``
    of them through SD v1.5's VAE and UNet at ``px``."""
    from promptdg_cli.ldm import LatentDiffusion, resolve_dtype

    dev, names = b.device, classnames("pacs")
    cfg = method_config(
        "domainfusion", "pacs", f"batch_size={batch}", f"distill_per_step={distilled}", f"ldm_resolution={px}"
    )
    vae, unet, sched = sd15(dev, torch.float32, px)
    text = _text_states(dev)
    ldm32 = LatentDiffusion(vae, unet, sched, text, "sd15-random", torch.float32)
    fast_dtype = resolve_dtype(str(cfg.ldm_dtype), dev)
    ldm_fast = (
        ldm32
        if fast_dtype == torch.float32
        else LatentDiffusion(
            copy.deepcopy(vae).to(dtype=fast_dtype),
            copy.deepcopy(unet).to(dtype=fast_dtype),
            sched,
            text,
            "sd15-random",
            fast_dtype,
        )
    )
    m = DomainFusion(cfg, resnet50(dev), names, dev, RunEnv(seed=0, precision=b.precision))
    n = batch * (domains + 1)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(n, 3, 224, 224, generator=g).to(dev), torch.randint(len(names), (n,), generator=g).to(dev)
    m.labels, m.rows, m.periods, m.n_source = (
        y,
        [torch.arange(i * batch, (i + 1) * batch) for i in range(domains)],
        [1],
        domains * batch,
    )
    m.syn_src, m.lo, m.hi = torch.arange(batch), int(0.02 * 999), int(0.98 * 999)
    m.draw = lambda gen: torch.arange(n)  # (this batch's draws: every image once)
    (step_batch,) = m.epoch_batches(0, torch.Generator().manual_seed(0))
    idx, seeds, mask = step_batch
    x01 = torch.rand(int(mask.sum()), 3, px, px, generator=g).to(dev)
    item = (step_batch, (idx, x, x01))
    opt = m.optimizer(m.parameters_to_train())
    plain = copy.deepcopy(m)
    plain_opt = plain.optimizer(plain.parameters_to_train())

    def plain_step():
        logits = plain.classifier(plain.featurizer(x))
        ce = F.cross_entropy(logits, y)
        rows = torch.nonzero(mask).flatten().to(dev)
        p = logits[rows].softmax(-1).gather(1, y[rows, None]).squeeze(1)
        z = vae.encode((p.view(-1, 1, 1, 1) * x01) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        t, eps = [], []
        for s in seeds[mask].tolist():
            gd = torch.Generator().manual_seed(s ^ 0x5EED)
            t.append(torch.randint(m.lo, m.hi + 1, (1,), generator=gd))
            eps.append(torch.randn((4, px // 8, px // 8), generator=gd))
        t, eps = torch.cat(t).to(dev), torch.stack(eps).to(dev)
        abar = sched.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z.detach() + (1 - abar).sqrt() * eps
        prompts = [cfg.prompt.format(names[int(c)]) for c in y[rows]]
        e_c = unet(z_t, t, encoder_hidden_states=text(prompts)).sample.detach()  # (outside no_grad, output detached)
        e_u = unet(z_t, t, encoder_hidden_states=text([""] * len(prompts))).sample.detach()
        grad = (1 - abar) * (e_u + cfg.distill_guidance * (e_c - e_u) - eps)
        loss = ce + cfg.distill_weight * (grad * z).flatten(1).sum(1).mean()
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    def promptdg_step():
        m._ldm = ldm32 if b.precision == "fp32" else ldm_fast  # (the check: fp32)
        return _loop_step(b, m, opt, item)

    out = _check_and_time(
        b,
        f"DomainFusion step ({domains + 1} x {batch} images, {int(mask.sum())} distilled through SD v1.5 at {px} px)",
        [("official", _named(plain), plain_step, plain_opt.step), ("promptdg", _named(m), promptdg_step, opt.step)],
    )
    return {
        "architecture": f"torchvision resnet50 + SD v1.5 VAE and UNet (random weights), {px} px",
        "batch_per_domain": batch,
        "domains": domains,
        "distilled": int(mask.sum()),
        "ldm_dtype_promptdg": str(fast_dtype),
        "official": "a plain implementation (fp32 LDM, UNet outside no_grad, two UNet calls, "
        "prompts encoded every call)",
        **out,
    }
