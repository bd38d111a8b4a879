"""One training step of each method, the official code's way and promptdg's way, with the check (in fp32) that
both compute the same loss and gradients (``benchmarks/bench.py`` and ``scripts/gpu_check.py`` use it).

**Official way**: what the official code computes in a step: the frozen image encoder on every batch
(no feature cache), every prompt through all 77 text positions, no prefix sharing:

* CoOp (KaiyangZhou/CoOp): one forward of the batch's images and the C class prompts, backward;
* DAPL (LeapLabTHU/DAPrompt, trainers/dapl.py): the model is called twice per step (source batch,
  target batch) and each call encodes all prompts: C classes x the run's domains plus the C naive
  prompts "a photo of a {class}." the pseudo-labels come from; the loss is the source CE over the
  source domain's columns plus U x the target CE over the target domain's columns against the
  pseudo-labels kept at confidence >= tau. (The two calls' gradients are taken one after the other,
  source then target, instead of from their sum: the same arithmetic, with one call's activations in
  memory at a time.);
* DAPT (mlvlab/DAPT, trainers/dapt.py): the batch through the VPT-prompted ViT and the C prompts,
  CE + beta_v mse(z, prototype) + beta_t mean exp(-t pdist(w)^2), backward;
* PromptStyler (no official code; the public re-implementations' way): one style iteration: the
  style prompt and the N style-content prompts through 77 positions, the i-1 earlier style prompts
  re-encoded (without gradient) every iteration; the N "[class]" features computed once.

The losses of the official way are written here from those descriptions, not taken from promptdg.

**promptdg way**: the method objects themselves (``batch_loss`` and the prompt learners on the
shared-prefix text path), fed as their ``fit`` feeds them, DAPT's image side through the prompted ViT,
PromptStyler's ``encode`` with the earlier styles' features stored. CoOp and DAPL are timed twice:

* in the official protocol (``promptdg_augmented_s``): the step plus the frozen encoder on a fresh
  view of the step's images (no gradient, the bench's precision), since every epoch encodes its
  views once (``views.py``); for DAPL also as a 12-pair Office-Home sweep shares them
  (``promptdg_augmented_sweep_s``: each domain's epoch view serves the 6 pairs it takes part in);
* in promptdg's cheaper protocol (``promptdg_s``, ``method.augment=none``): cached features only.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import numpy as np

# isort: off
import promptdg_cli.backbone  # noqa: F401  (torchvision shim before open_clip)
# isort: on
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from promptdg_cli.backbone import ClipBackbone
from promptdg_cli.config import compose_method, conf_dir
from promptdg_cli.data import Features
from promptdg_cli.devices import autocast
from promptdg_cli.methods.base import RunEnv
from promptdg_cli.methods.coop import CoOp
from promptdg_cli.methods.dapl import DAPL, SUFFIXES
from promptdg_cli.methods.dapt import DAPT, class_prototypes
from promptdg_cli.methods.promptstyler import PLACEHOLDER, PromptStyler, content_consistency_loss, style_diversity_loss
from promptdg_cli.protocols import TrainData
from promptdg_cli.training import StepInfo
from promptdg_cli.views import Plain

# |official - promptdg| allowed, relative: (loss, largest gradient entry). The check runs in fp32 (the
# two paths then differ in the order of their sums only); the timings in the bench's precision (bf16
# autocast rounds each path differently, and random weights leave DAPL's pseudo-labels near ties).
TOLERANCE = (1e-4, 1e-3)


# --------------------------------------------------------------------- set-up
@dataclass
class Bench:
    """The frozen CLIP, where it runs and how the timings are taken."""

    clip: ClipBackbone
    device: torch.device
    repeats: int = 3  # timed runs of promptdg's way (the median is kept)
    repeats_official: int = 0  # of the official way; 0: its checked run's time (see _measure)
    warmup: bool = False  # an untimed run of each way in the timing's precision before its timed runs (the GPU check)
    precision: str = "fp32"  # autocast of both ways' forward on CUDA (bf16 / fp16)
    breakdown: bool = False  # also time promptdg's way on the plain truncated path (no prefix sharing)
    image_size: int = 224
    _encode_s: Optional[float] = field(default=None, repr=False)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object], repeats: Optional[int] = None, cpu: bool = False):
        """Median wall time of ``fn`` over ``repeats`` calls (the caller has run it once already);
        ``cpu``: (wall, this process's CPU time), the latter robust to other processes on a shared CPU."""
        walls, cpus = [], []
        for _ in range(repeats or self.repeats):
            self.sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            self.sync()
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        return (statistics.median(walls), statistics.median(cpus)) if cpu else statistics.median(walls)

    def autocast(self):
        return autocast(self.device, self.precision)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> Optional[float]:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if self.device.type == "cuda" else None

    def images(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, self.image_size, self.image_size, generator=g).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features, as the feature cache computes them (in fp32, like the check)."""
        return self.clip.encode_image(images, normalize=True).float()

    def view_pass(self, images: torch.Tensor) -> torch.Tensor:
        """A fresh view's features, as an epoch's views are encoded: no gradient, the bench's precision."""
        with torch.no_grad(), self.autocast():
            return F.normalize(self.clip.encode_image(images), dim=-1).float()

    def encode_s(self, batch: int) -> float:
        """Seconds of the frozen image encoder on a batch (the cache's one-time cost per image)."""
        if self._encode_s is None:  # (the step sections have run the encoder already: no warm-up)
            x = self.images(batch, 99)
            self._encode_s = self.timed(lambda: self.encode_images(x), 1)
        return self._encode_s


def build_clip(model: str, device: torch.device, precision: str = "fp32", seed: int = 0) -> ClipBackbone:
    """An open_clip model with random weights (timing does not depend on them) as a ClipBackbone."""
    torch.manual_seed(seed)
    m, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None, device=device)
    return ClipBackbone(m, open_clip.get_tokenizer(model), preprocess, model, "random-init", "vit", precision)


def image_size(clip: ClipBackbone) -> int:
    size = clip.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def method_config(choice: str, dataset: str = "demo_digits", *overrides: str):
    """A method's config as ``promptdg train method=<choice> dataset=<dataset>`` composes it (config.compose_method)."""
    return compose_method(choice, *overrides, dataset=dataset)


def classnames(dataset: str) -> List[str]:
    """The prompt names of a dataset config's classes (Office-Home: 65, DomainNet: 345)."""
    return [str(v) for v in OmegaConf.load(conf_dir() / "dataset" / f"{dataset}.yaml").classes.values()]


class _Ctx:
    """What ``fit`` needs of a TrainContext when only one step is to be measured: the loop is not run."""

    def log(self, **kw) -> None:
        pass

    def train(self, m) -> None:
        pass


def _features(x: torch.Tensor, y: torch.Tensor, domain: str) -> Features:
    return Features(x.cpu(), y.cpu(), [domain] * len(y), [f"{domain}/{i}.png" for i in range(len(y))])


def _empty(dim: int) -> Features:
    return Features(torch.zeros(0, dim), torch.zeros(0, dtype=torch.long), [], [])


def _loop_step(b: Bench, m, opt, item) -> torch.Tensor:
    """The training loop's step (training.TrainContext.train, one process): the method's terms under
    the run's autocast, their weighted sum, backward; the caller steps the optimiser."""
    with b.autocast():
        terms = m.batch_loss(item, StepInfo(0, 0))
    loss = sum(t.weight * t.loss for t in terms if t.loss is not None and t.n)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def _full77(clip: ClipBackbone, texts: List[str]):
    """The official prompt inputs: tokens padded to 77, their embeddings and EOT positions."""
    tokens = clip.tokenize(texts)
    with torch.no_grad():
        return clip.token_embedding(tokens), clip.eot_positions(tokens)


def _compare(b: Bench, params, official: Callable[[], torch.Tensor], promptdg: Callable[[], torch.Tensor]) -> dict:
    """Loss and gradients of both ways from the same parameter values, and the time each took (this
    first call of each way also warms it up)."""
    grads, losses, times = [], [], []
    precision, b.precision = b.precision, "fp32"
    try:
        for fn in (official, promptdg):
            for p in params:
                p.grad = None
            b.sync()
            t, c = time.perf_counter(), time.process_time()
            losses.append(float(fn()))
            b.sync()
            times.append((time.perf_counter() - t, time.process_time() - c))
            grads.append([p.grad.detach().float().clone() for p in params])
    finally:
        b.precision = precision
    rtol_loss, rtol_grad = TOLERANCE
    scale = max(float(g.abs().max()) for g in grads[0])
    grad_diff = max(float((a - c).abs().max()) for a, c in zip(*grads))
    loss_diff = abs(losses[0] - losses[1])
    return {"loss_official": losses[0], "loss_promptdg": losses[1], "loss_abs_diff": loss_diff,
            "grad_max_abs_diff": grad_diff, "grad_max_abs": scale,
            "precision": "fp32", "tolerance": {"loss_rel": rtol_loss, "grad_rel_to_max": rtol_grad},
            "equal": bool(loss_diff <= rtol_loss * max(1.0, abs(losses[0])) and grad_diff <= rtol_grad * scale),
            "_times": times}


def _measure(b: Bench, name: str, params, opt, official, promptdg, heavy: bool = False) -> dict:
    """Check (in fp32), then time a whole step (forward, backward, optimiser step) of each way in the
    bench's precision: the median of ``b.repeats`` runs after the checked one (and, with ``b.warmup`` or
    a timing precision other than the check's, after an untimed run in that precision); with
    ``b.repeats_official = 0`` the official way's time is its checked run's (forward and backward; a
    step of a minute or more on a CPU), and so is promptdg's in a ``heavy`` section (DAPT: both ways
    run the prompted ViT), unless the check's precision is not the timing's (bf16 on CUDA)."""
    check = _compare(b, params, official, promptdg)
    first = check.pop("_times")
    out = {"check": check}
    fp32_timing = b.device.type != "cuda" or b.precision == "fp32"  # the checked run (fp32) times this precision
    for k, (way, fn) in enumerate((("official", official), ("promptdg", promptdg))):
        reps = b.repeats_official if way == "official" or heavy else b.repeats
        reps = reps or (0 if fp32_timing else 1)
        if reps and (b.warmup or not fp32_timing):  # (lazy kernels and library set-up outside the timed runs)
            fn()
            opt.step()
        b.reset_peak()
        if reps:
            wall, cpu = b.timed(lambda fn=fn: (fn(), opt.step()), reps, cpu=True)
        else:
            if b.device.type == "cuda":
                fn()  # (the peak memory of one run)
            wall, cpu = first[k]
        out[f"{way}_s"], out[f"{way}_cpu_s"] = round(wall, 4), round(cpu, 4)
        out[f"{way}_timed_runs"] = reps or "the checked run"
        # (+ the checked run, in fp32)
        out[f"{way}_warmup_runs"] = int(bool(reps and (b.warmup or not fp32_timing))) + 1
        out[f"{way}_cuda_peak_mb"] = b.peak_mb()
    if b.breakdown:  # promptdg's way without prefix sharing: what the shared prefix adds
        b.clip.use_shared_prefix = False
        try:
            promptdg()
            out["promptdg_plain_truncated_s"] = round(b.timed(lambda: (promptdg(), opt.step())), 4)
        finally:
            del b.clip.use_shared_prefix
    out["speedup"] = round(out["official_s"] / out["promptdg_s"], 2)
    out["speedup_cpu_time"] = (
        round(out["official_cpu_s"] / out["promptdg_cpu_s"], 2) if out["promptdg_cpu_s"] > 0 else None
    )
    print(
        f"{name}: official way {out['official_s']:.3f} s, promptdg {out['promptdg_s']:.3f} s -> {out['speedup']:.1f}x; "
        f"loss {check['loss_official']:.6f} vs {check['loss_promptdg']:.6f}, "
        f"max |grad diff| {check['grad_max_abs_diff']:.2e} (max |grad| {check['grad_max_abs']:.2e}): "
        f"{'equal' if check['equal'] else 'NOT EQUAL'}",
        flush=True,
    )
    return out


# --------------------------------------------------------------------- CoOp
def coop_step(b: Bench, names: List[str], batch: int = 32, dataset: str = "demo_digits") -> dict:
    clip, dev = b.clip, b.device
    cfg = method_config("coop", dataset)
    images, y = (
        b.images(batch, 1),
        torch.randint(len(names), (batch,), generator=torch.Generator().manual_seed(1)).to(dev),
    )
    m = CoOp(cfg, clip, names, dev, RunEnv(seed=0, precision=b.precision))
    x = b.encode_images(images)
    m.fit(TrainData(train=_features(x, y, "source"), val=_empty(clip.embed_dim), train_views=Plain(x)), _Ctx())
    m.on_epoch(0, _Ctx())
    params = m.parameters_to_train()
    opt = m.optimizer(params)
    emb, eot = _full77(clip, [f"{' '.join(['X'] * cfg.n_ctx)} {n}." for n in names])
    suffix = emb[:, 1 + cfg.n_ctx :]
    idx = torch.arange(batch)

    def official():
        with b.autocast():
            with torch.no_grad():
                img = F.normalize(clip.encode_image(images), dim=-1)
            ctx = m.prompt.ctx.expand(len(names), -1, -1)
            text = clip.encode_prompts(torch.cat([emb[:, :1], ctx, suffix], dim=1), eot, truncate=False)
            loss = F.cross_entropy(clip.logit_scale * img @ text.T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    out = _measure(b, f"CoOp step ({batch} images, {len(names)} classes)", params, opt, official,
                   lambda: _loop_step(b, m, opt, idx))
    out |= _augmented(b, out, [images], lambda: (_loop_step(b, m, opt, idx), opt.step()))
    return {"classes": len(names), "batch": batch, "n_ctx": cfg.n_ctx, "positions_official": clip.context_length,
            "positions_promptdg": int(m.prompt.eot.max()) + 1, **out}


def _augmented(b: Bench, out: dict, batches: List[torch.Tensor], step: Callable[[], object], share: int = 1) -> dict:
    """promptdg's step in the official protocol: the frozen encoder on a fresh view of the step's images
    (every epoch encodes its views once), then the step; ``share``: runs of a sweep that read one view."""
    for x in batches:  # (warm-up at this batch shape)
        b.view_pass(x)
    view_s = b.timed(lambda: [b.view_pass(x) for x in batches])
    step_s = out["promptdg_s"]
    res = {"view_pass_s": round(view_s, 4), "promptdg_augmented_s": round(step_s + view_s, 4),
           "speedup_augmented": round(out["official_s"] / (step_s + view_s), 2)}
    if share > 1:
        res |= {"view_share": share, "promptdg_augmented_sweep_s": round(step_s + view_s / share, 4),
                "speedup_augmented_sweep": round(out["official_s"] / (step_s + view_s / share), 2)}
    print(
        f"  in the official protocol (a fresh view per image and epoch): "
        f"promptdg {res['promptdg_augmented_s']:.3f} s -> {res['speedup_augmented']:.1f}x"
        + (f"; views shared by {share} runs of a sweep: {res['speedup_augmented_sweep']:.1f}x" if share > 1 else ""),
        flush=True,
    )
    step()
    return res


# --------------------------------------------------------------------- DAPL
def _middle_tau(conf: torch.Tensor) -> float:
    """A threshold at the widest gap between two target confidences in the middle half of their order,
    so that between a quarter and three quarters of the batch are kept (random weights give
    confidences near 1/C: the paper's tau would keep none)."""
    s = conf.sort().values.cpu()
    n = len(s)
    lo, hi = n // 4, max(n // 4 + 1, (3 * n) // 4)
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    k = int(gaps.argmax()) + lo
    return float((s[k] + s[k + 1]) / 2)


def dapl_step(b: Bench, names: List[str], batch: int = 32, dataset: str = "officehome",
              domains=("Art", "Real World")) -> dict:
    clip, dev = b.clip, b.device
    cfg = method_config("dapl", dataset, f"batch_size={batch}", f"target_batch_size={batch}")
    g = torch.Generator().manual_seed(2)
    src, tgt = b.images(batch, 2), b.images(batch, 3)
    y = torch.randint(len(names), (batch,), generator=g).to(dev)
    xs, xt = b.encode_images(src), b.encode_images(tgt)
    with torch.no_grad():  # a tau that keeps part of the target batch (see _middle_tau)
        zs = clip.zeroshot_weights(names, [cfg.pseudo_template])
        cfg.tau = _middle_tau(torch.softmax(clip.logit_scale * xt @ zs.T / cfg.T, -1).max(-1).values)
    m = DAPL(cfg, clip, names, dev, RunEnv(seed=0, precision=b.precision))
    data = TrainData(train=_features(xs, y, domains[0]), target=_features(xt, torch.full((batch,), -1), domains[1]),
                     train_views=Plain(xs), target_views=Plain(xt))
    b.sync()
    t = time.perf_counter()
    m.fit(data, _Ctx())  # prompts
    m.on_epoch(0, _Ctx())  # the epoch's views and their pseudo-labels (once per epoch)
    b.sync()
    setup_s = time.perf_counter() - t
    (item,) = m.epoch_batches(0, torch.Generator().manual_seed(0))
    params = m.parameters_to_train()
    opt = m.optimizer(params)
    c, n_dom = len(names), len(m.domains)
    # the official model's prompts: (domain, class) rows of "[SOS][ctx][dom] suffix" + the naive prompts, 77 positions
    placeholder = " ".join(["X"] * (cfg.n_ctx + cfg.n_dom_ctx))
    texts = [f"{placeholder} {SUFFIXES[str(cfg.prompt)].format(name=n, domain=w)}" for w in m.words for n in names]
    emb, eot = _full77(clip, texts + [cfg.pseudo_template.format(n) for n in names])
    head = 1 + cfg.n_ctx + cfg.n_dom_ctx
    sos, suffix, naive = emb[: n_dom * c, :1], emb[: n_dom * c, head:], emb[n_dom * c :]
    target_col = m.target_row * c

    def call(images):  # CustomCLIP.forward: image encoder, all prompts, scaled cosines (B, (n_dom + 1) C)
        with torch.no_grad():
            img = F.normalize(clip.encode_image(images), dim=-1)
        ctx = m.prompt.ctx.expand(n_dom * c, -1, -1)
        dom = m.prompt.dom.repeat_interleave(c, dim=0)
        learned = torch.cat([sos, ctx, dom, suffix], dim=1)
        text = clip.encode_prompts(torch.cat([learned, naive]), eot, truncate=False)
        return clip.logit_scale * img @ text.T

    def official():
        opt.zero_grad(set_to_none=True)
        with b.autocast():
            loss_x = F.cross_entropy(call(src)[:, :c], y)  # source images over the source domain's prompts
        loss_x.backward()
        with b.autocast():
            out_u = call(tgt)
            conf, label = torch.softmax(out_u[:, -c:].detach() / cfg.T, -1).max(-1)
            mask = (conf >= cfg.tau).float()
            ce = F.cross_entropy(out_u[:, target_col : target_col + c], label, reduction="none")
            loss_u = (ce * mask).sum() / mask.sum().clamp_min(1.0)
        (cfg.U * loss_u).backward()
        return (loss_x + cfg.U * loss_u).detach()

    out = _measure(
        b,
        f"DAPL step ({batch}+{batch} images, {c} classes x {n_dom} domains + {c} naive prompts)",
        params,
        opt,
        official,
        lambda: _loop_step(b, m, opt, item),
    )
    # official protocol: both batches' fresh views; an Office-Home domain takes part in 6 of the 12 pairs
    out |= _augmented(b, out, [src, tgt], lambda: (_loop_step(b, m, opt, item), opt.step()), share=6)
    kept = int(m.keep.sum())
    return {
        "classes": c,
        "domains": n_dom,
        "source_batch": batch,
        "target_batch": batch,
        "prompts_official_per_call": (n_dom + 1) * c,
        "calls_official": 2,
        "positions_official": clip.context_length,
        "tau_used": round(cfg.tau, 6),
        "target_kept": kept,
        "promptdg_setup_s": round(setup_s, 4),
        **out,
    }


# --------------------------------------------------------------------- DAPT
def dapt_step(b: Bench, names: List[str], batch: int = 32, dataset: str = "officehome") -> dict:
    clip, dev = b.clip, b.device
    cfg = method_config("dapt", dataset)
    images = b.images(batch, 4)
    y_cpu = torch.randint(len(names), (batch,), generator=torch.Generator().manual_seed(4))
    y = y_cpu.to(dev)
    m = DAPT(cfg, clip, names, dev, RunEnv(seed=0, precision=b.precision))
    m.protos = class_prototypes(b.encode_images(images).cpu(), y_cpu, len(names), cfg.renormalize_prototypes).to(dev)
    m.shots, m.order = SimpleNamespace(y=y_cpu), np.arange(batch)  # what fit and epoch_batches set
    params = m.parameters_to_train()
    opt = m.optimizer(params)
    emb, eot = _full77(clip, [f"{' '.join(['X'] * cfg.n_ctx)} {n}." for n in names])
    suffix = emb[:, 1 + cfg.n_ctx :]
    item = (torch.arange(batch), images, [])

    def official():
        with b.autocast():
            z = F.normalize(m.visual(images), dim=-1)  # the prompted ViT (VPT prompts after [CLS])
            ctx = m.prompt.ctx.expand(len(names), -1, -1)
            w = clip.encode_prompts(torch.cat([emb[:, :1], ctx, suffix], dim=1), eot, truncate=False)
            ce = F.cross_entropy(clip.logit_scale * z @ w.T, y)
            l_intra = F.mse_loss(z.float(), m.protos[y])
            l_inter = torch.pdist(w.float(), p=2).pow(2).mul(-cfg.t).exp().mean()
            loss = ce + cfg.beta_v * l_intra + cfg.beta_t * l_inter
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    out = _measure(
        b,
        f"DAPT step ({batch} images through the prompted ViT, {len(names)} classes)",
        params,
        opt,
        official,
        lambda: _loop_step(b, m, opt, item),
        heavy=True,
    )
    return {
        "classes": len(names),
        "batch": batch,
        "visual_prompts": cfg.n_visual,
        "n_ctx": cfg.n_ctx,
        "positions_official": clip.context_length,
        "positions_promptdg": int(m.prompt.eot.max()) + 1,
        "note": "both ways run the image side through the prompted ViT (forward and backward); "
        "only the text side differs",
        **out,
    }


# --------------------------------------------------------------------- PromptStyler
def promptstyler_iteration(b: Bench, names: List[str], i: int = 40, dataset: str = "domainnet") -> dict:
    """Style i (1-based, the paper's index: i-1 earlier styles) of stage 1."""
    clip, dev = b.clip, b.device
    cfg = method_config("promptstyler", dataset)
    m = PromptStyler(cfg, clip, names, dev, RunEnv(seed=0, precision=b.precision))
    with torch.no_grad():
        m.content = clip.encode_text(names, normalize=True)  # T("[class]"), once per run (fit)
        earlier_words = torch.stack(
            [
                torch.randn(clip.text_width, generator=torch.Generator().manual_seed(7 + j)) * cfg.style_init_std
                for j in range(i - 1)
            ]
        ).to(dev)  # (i-1, W): styles learned before
        earlier = (
            torch.stack([m.encode(w)[0] for w in earlier_words])
            if i > 1
            else torch.zeros(0, clip.embed_dim, device=dev)
        )
        content77 = clip.encode_text(names, normalize=True, truncate=False)  # the official way's, also once
    s = torch.nn.Parameter(m.init_style(i - 1))
    opt = torch.optim.SGD([s], lr=cfg.style_lr, momentum=cfg.style_momentum)
    style_text = cfg.style_template.format(PLACEHOLDER)
    emb, eot = _full77(clip, [style_text] + [f"{style_text} {n}" for n in names])
    at = m.prompts.position

    def official():
        with b.autocast():
            rows = torch.cat([emb[:, :at], s.view(1, 1, -1).expand(len(emb), 1, -1), emb[:, at + 1 :]], dim=1)
            f = F.normalize(clip.encode_prompts(rows, eot, truncate=False), dim=-1)
            with torch.no_grad():  # the earlier style prompts, re-encoded every iteration
                prev_rows = torch.cat(
                    [
                        emb[:1, :at].expand(i - 1, -1, -1),
                        earlier_words[:, None],
                        emb[:1, at + 1 :].expand(i - 1, -1, -1),
                    ],
                    dim=1,
                )
                prev = F.normalize(clip.encode_prompts(prev_rows, eot[:1].expand(i - 1), truncate=False), dim=-1)
            l_style = (prev @ f[0]).abs().mean() if i > 1 else f[0].sum() * 0
            z = f[1:] @ content77.T  # cos(style-content m, content n)
            l_content = F.cross_entropy(z.float(), torch.arange(len(names), device=dev))
            loss = l_style + l_content
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    def promptdg():  # the body of PromptStyler.learn_style's loop
        with b.autocast():
            style_f, sc_f = m.encode(s)
            loss = style_diversity_loss(style_f, earlier) + content_consistency_loss(sc_f, m.content)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    out = _measure(b, f"PromptStyler style iteration (N = {len(names)} classes, style {i}: {i - 1} earlier)", [s], opt,
                   official, promptdg)
    return {"classes": len(names), "style_index": i, "earlier_styles": i - 1, "styles_K": cfg.n_styles,
            "iterations_L": cfg.style_iters, "positions_official": clip.context_length,
            "positions_promptdg": int(m.prompts.eot.max()) + 1, "prefix_positions_promptdg": m.prompts.shared, **out}


STEPS: Dict[str, Callable] = {
    "coop": coop_step,
    "dapl": dapl_step,
    "dapt": dapt_step,
    "promptstyler": promptstyler_iteration,
}
