"""DAPL: Domain Adaptation via Prompt Learning (Ge et al., IEEE TNNLS 2023,
https://arxiv.org/abs/2202.06687).

Unsupervised domain adaptation with frozen CLIP encoders. Every domain d of the run (each source
and the target) and every class k get a prompt

    [ctx_1 .. ctx_M1] [dom_d,1 .. dom_d,M2] [CLASS_k] .

whose domain-agnostic context ctx (M1 = 16 vectors, shared by all classes, or one set per class:
``class_specific``) is shared by all domains, and whose domain-specific context dom_d (M2 = 16
vectors) is shared by the classes of domain d. With t_{d,k} the normalised text feature of that
prompt and s CLIP's logit scale, an image x of domain d scores p_d(k | x) = softmax_k(s <x, t_{d,k}>).

Loss = CE over labelled source images, each against its own domain's prompts
     + U · CE over unlabelled target images against the target-domain prompts, with the zero-shot
       CLIP pseudo-label ŷ = argmax softmax(s <x, z_k> / T), z_k the feature of "a photo of a [class].",
       kept only where max softmax(s <x, z_k> / T) ≥ τ.
The target term is the mean over the kept images of a batch; a batch where none is kept adds 0
(the public code divides by the number kept and gives NaN). The target is predicted with the
target-domain prompts.

What differs from the public implementation, on purpose:
* any source→target pair, and several source domains at once (each with its own dom_d), chosen on
  the command line (``source=[...] target=...``), not one hard-coded pair per config file;
* model selection on a held-out 20 % of the labelled source data (or the last epoch), never on
  target labels: training sees the target's features without labels, and the engine keeps the
  labelled target for the final test only;
* the image encoder is frozen, so training reads cached image features; ``aug_views`` K > 0 trains
  on K cached augmented views per image (random resized crop + flip), one drawn per image and epoch.

Defaults (the paper's): M1 = M2 = 16, SGD lr 0.003 (momentum 0.9, weight decay 5e-4), cosine
schedule with one warm-up epoch at 1e-5, batch 32 source + 32 target, T = 1, U = 1; τ = 0.5 on
VisDA-2017 and 0.6 on Office-Home (``tau: null`` picks by dataset, 0.6 elsewhere). An epoch is one
pass over the source training images; target batches cycle through a fresh permutation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import MethodConfig
from .base import Method
from .coop import warmup_cosine_lr
from .zeroshot import zeroshot_weights

PAPER_TAU = {"visda17": 0.5, "officehome": 0.6}  # the paper's confidence thresholds
DEFAULT_TAU = 0.6


@dataclass
class DAPLConfig(MethodConfig):
    name: str = "dapl"
    n_ctx: int = 16  # M1, domain-agnostic context
    n_dom_ctx: int = 16  # M2, domain-specific context
    class_specific: bool = False  # one domain-agnostic context per class (the paper's VisDA-2017 RN101 setting)
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    batch_size: int = 32  # source images per step
    target_batch_size: int = 32  # target images per step
    epochs: int = 25
    warmup_epochs: int = 1
    warmup_lr: float = 1.0e-5
    T: float = 1.0  # temperature of the pseudo-label softmax
    tau: Optional[float] = None  # confidence threshold; None: the paper's value for the dataset
    U: float = 1.0  # weight of the target term
    pseudo_template: str = "a photo of a {}."
    aug_views: int = 0  # K cached augmented views per image; 0: the un-augmented features
    select: str = "val"  # val: best source-validation epoch | last


# --------------------------------------------------------------------- the loss of the paper
def pseudo_labels(zs_logits: torch.Tensor, T: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ, keep) from zero-shot logits (B, C): ŷ = argmax softmax(logits / T), keep = max prob ≥ τ."""
    conf, label = torch.softmax(zs_logits / T, dim=-1).max(dim=-1)
    return label, conf >= tau


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the kept rows; exactly 0 (with a graph) when none is kept."""
    if not bool(keep.any()):
        return logits.sum() * 0.0 + 0.0
    return F.cross_entropy(logits[keep], labels[keep])


def dapl_loss(
    text: torch.Tensor,  # (n_domains, C, D) normalised prompt features
    scale: torch.Tensor | float,
    x_src: torch.Tensor,  # (B, D) normalised source features
    d_src: torch.Tensor,  # (B,) domain row of each source image
    y_src: torch.Tensor,  # (B,)
    x_tgt: torch.Tensor,  # (B', D) normalised target features
    target_row: int,
    pseudo: torch.Tensor,  # (B',) pseudo-labels
    keep: torch.Tensor,  # (B',) bool
    U: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, source CE, target CE): CE(s <x, t_{d(x),k}>) + U · masked CE(s <x, t_{target,k}>, ŷ)."""
    logits_src = scale * torch.einsum("bd,bkd->bk", x_src, text[d_src])  # each image over its own domain's prompts
    l_src = F.cross_entropy(logits_src, y_src)
    logits_tgt = scale * x_tgt @ text[target_row].T
    l_tgt = masked_cross_entropy(logits_tgt, pseudo, keep)
    return l_src + U * l_tgt, l_src, l_tgt


# --------------------------------------------------------------------- prompts
class DomainPromptLearner(nn.Module):
    """Prompts [ctx][dom_d][CLASS_k] for every domain d and class k, rows domain-major (d·C + k)."""

    def __init__(self, backbone, classnames: list[str], n_domains: int, n_ctx: int, n_dom_ctx: int, class_specific: bool, seed: int):
        super().__init__()
        width, c = backbone.text_width, len(classnames)
        g = torch.Generator().manual_seed(seed)
        ctx_shape = (c, n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.empty(ctx_shape).normal_(0, 0.02, generator=g).to(backbone.device))
        self.dom = nn.Parameter(torch.empty(n_domains, n_dom_ctx, width).normal_(0, 0.02, generator=g).to(backbone.device))
        placeholder = " ".join(["X"] * (n_ctx + n_dom_ctx))
        tokens = backbone.tokenize([f"{placeholder} {name}." for name in classnames])  # (C, 77)
        eot = backbone.eot_positions(tokens)
        length = int(eot.max()) + 1  # the truncated text path: nothing after the last EOS
        with torch.no_grad():
            emb = backbone.token_embedding(tokens[:, :length])
        self.register_buffer("prefix", emb[:, :1].clone())  # [SOS]
        self.register_buffer("suffix", emb[:, 1 + n_ctx + n_dom_ctx :].clone())  # class, ".", [EOS], padding
        self.register_buffer("eot_per_class", eot)
        self.n_classes, self.n_domains = c, n_domains

    def forward(self, domains: Optional[list[int]] = None) -> torch.Tensor:
        """Token embeddings (len(domains) * C, L, W) of the prompts of ``domains`` (default: all)."""
        c = self.n_classes
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(c, -1, -1)  # (C, M1, W)
        rows = []
        for d in range(self.n_domains) if domains is None else domains:
            dom = self.dom[d].unsqueeze(0).expand(c, -1, -1)  # (C, M2, W)
            rows.append(torch.cat([self.prefix, ctx, dom, self.suffix], dim=1))
        return torch.cat(rows)


# --------------------------------------------------------------------- the method
class DAPL(Method):
    Config = DAPLConfig
    protocol = "uda"

    def __init__(self, cfg, backbone, classnames, device):
        super().__init__(cfg, backbone, classnames, device)
        self.prompt: Optional[DomainPromptLearner] = None  # built when the run's domains are known
        self.domains: list[str] = []
        self.target_row = -1

    def setup(self, domains: list[str], target: str, seed: int) -> None:
        """Prompts for ``domains`` (sources then target); row ``target_row`` predicts."""
        self.domains, self.target_row = list(domains), list(domains).index(target)
        cfg = self.cfg
        self.prompt = DomainPromptLearner(self.backbone, self.classnames, len(domains), cfg.n_ctx, cfg.n_dom_ctx, cfg.class_specific, seed)

    def text_features(self, domains: Optional[list[int]] = None, prompt=None) -> torch.Tensor:
        """(n, C, D) normalised features of the prompts of ``domains`` (default: all), one text batch;
        ``prompt``: the module to run (training: its DDP wrapper), default self.prompt."""
        idx = list(range(self.prompt.n_domains)) if domains is None else domains
        eot = self.prompt.eot_per_class.repeat(len(idx))
        f = self.backbone.encode_prompts((self.prompt if prompt is None else prompt)(idx), eot)
        return f.view(len(idx), self.prompt.n_classes, -1)

    def lr_at(self, epoch: int) -> float:
        return warmup_cosine_lr(epoch, self.cfg.lr, self.cfg.epochs, self.cfg.warmup_epochs, self.cfg.warmup_lr)

    def tau_for(self, dataset: str) -> float:
        return self.cfg.tau if self.cfg.tau is not None else PAPER_TAU.get(dataset, DEFAULT_TAU)

    @torch.no_grad()
    def source_accuracy(self, feats) -> float:
        """Accuracy of source images, each scored with its own domain's prompts (model selection)."""
        text = self.text_features()
        rows = torch.tensor([self.domains.index(d) for d in feats.domain], device=self.device)
        x = feats.x.to(self.device)
        pred = torch.einsum("bd,bkd->bk", x, text[rows]).argmax(-1).cpu()
        return round(100 * (pred == feats.y).float().mean().item(), 4)

    def fit(self, data, ctx):
        from ..engine import resume_point

        cfg = self.cfg
        train, target = data["train"], data["target"]
        assert bool((target.y < 0).all()), "UDA training must not see target labels"
        sources = list(dict.fromkeys(train.domain))
        self.setup(sources + [target.domain[0]], target.domain[0], ctx.seed)
        tau = self.tau_for(ctx.dataset)
        dev = self.device
        # views: (V, N, D); view 0 is the un-augmented feature, used when aug_views = 0
        xs = data["train_views"].to(dev) if "train_views" in data else train.x.to(dev)[None]
        xt = data["target_views"].to(dev) if "target_views" in data else target.x.to(dev)[None]
        ys = train.y.to(dev)
        ds = torch.tensor([self.domains.index(d) for d in train.domain], device=dev)
        scale = self.backbone.logit_scale
        with torch.no_grad():  # zero-shot pseudo-labels, once, from the un-augmented target features
            zs = zeroshot_weights(self.backbone, self.classnames, [cfg.pseudo_template])
            pseudo, keep = pseudo_labels(scale * target.x.to(dev) @ zs.T, cfg.T, tau)
        ctx.log(pseudo_labels_kept=int(keep.sum()), target_images=len(keep), tau=tau)

        params = [self.prompt.ctx, self.prompt.dom]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        best = {"acc": -1.0, "epoch": -1, "ctx": self.prompt.ctx.detach().clone(), "dom": self.prompt.dom.detach().clone()}
        state = ctx.load_checkpoint()
        # resume: after the last epoch, or mid-epoch after the step in progress when a preemption
        # signal came (the epoch's orders are seeded by (seed, epoch): the steps done are skipped)
        start, done = resume_point(state)
        resumed_sums = torch.zeros(4, dtype=torch.float64)
        if state is not None:
            self.prompt.ctx.data.copy_(state["ctx"])
            self.prompt.dom.data.copy_(state["dom"])
            opt.load_state_dict(state["optimizer"])
            best = state["best"]
            if done:
                resumed_sums = state["sums"].cpu().double()
        # torchrun: every rank takes its shard of the source and of the target batch; the prompt
        # learner (run once per step) is in DDP, gradients summed; the source term is weighted by the
        # shard's share of the source batch, the target term by its share of the kept target images
        prompt = ctx.ddp(self.prompt)
        n_src, n_tgt = ys.shape[0], xt.shape[1]
        for epoch in ctx.progress(range(start, cfg.epochs), desc="dapl epochs", initial=start, total=cfg.epochs):
            for grp in opt.param_groups:
                grp["lr"] = self.lr_at(epoch)
            g = torch.Generator().manual_seed(ctx.seed * 100003 + epoch)
            order_s = torch.randperm(n_src, generator=g).to(dev)
            order_t = torch.randperm(n_tgt, generator=g).to(dev)
            view_s = torch.randint(xs.shape[0], (n_src,), generator=g).to(dev)
            view_t = torch.randint(xt.shape[0], (n_tgt,), generator=g).to(dev)
            first = done if epoch == start else 0
            base = resumed_sums if first else torch.zeros(4, dtype=torch.float64)  # loss, l_src, l_tgt, kept
            sums = torch.zeros(4, dtype=torch.float64)  # this rank's part since (re)start
            for b, i in enumerate(range(first * cfg.batch_size, n_src, cfg.batch_size), start=first):
                si_all = order_s[i : i + cfg.batch_size]
                tj_all = order_t[(torch.arange(cfg.target_batch_size, device=dev) + b * cfg.target_batch_size) % n_tgt]
                si, tj = ctx.shard(si_all), ctx.shard(tj_all)
                text = self.text_features(prompt=prompt)
                if len(si):
                    _, l_src, l_tgt = dapl_loss(
                        text, scale,
                        xs[view_s[si], si], ds[si], ys[si],
                        xt[view_t[tj], tj], self.target_row, pseudo[tj], keep[tj], cfg.U,
                    )
                else:  # a last source batch smaller than the number of ranks
                    l_src = text.sum() * 0.0
                    l_tgt = masked_cross_entropy(scale * xt[view_t[tj], tj] @ text[self.target_row].T, pseudo[tj], keep[tj])
                l_src = ctx.batch_share(l_src, len(si), len(si_all))
                l_tgt = ctx.batch_share(l_tgt, int(keep[tj].sum()), int(keep[tj_all].sum()))
                loss = l_src + cfg.U * l_tgt
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += torch.tensor([loss.item(), l_src.item(), l_tgt.item(), int(keep[tj].sum())], dtype=torch.float64)
                ctx.preempt_point(lambda: {"epoch": epoch, "step": b + 1, "ctx": self.prompt.ctx.detach(), "dom": self.prompt.dom.detach(),
                                           "optimizer": opt.state_dict(), "best": best, "sums": base + ctx.all_sum(sums)})
            sums = (base + ctx.all_sum(sums)).tolist()
            steps = -(-n_src // cfg.batch_size)
            val_acc = self.source_accuracy(data["val"]) if len(data["val"]) else float("nan")
            val_acc = ctx.broadcast(val_acc)  # every rank selects the same epoch
            if cfg.select == "last" or not len(data["val"]) or val_acc > best["acc"]:
                best = {"acc": val_acc, "epoch": epoch, "ctx": self.prompt.ctx.detach().clone(), "dom": self.prompt.dom.detach().clone()}
            ctx.log(epoch=epoch, lr=self.lr_at(epoch), loss=sums[0] / steps, l_src=sums[1] / steps,
                    l_tgt=sums[2] / steps, kept_per_step=sums[3] / steps, val_acc=val_acc)
            ctx.save_checkpoint({"epoch": epoch, "ctx": self.prompt.ctx.detach(), "dom": self.prompt.dom.detach(),
                                 "optimizer": opt.state_dict(), "best": best})
        self.prompt.ctx.data.copy_(best["ctx"])
        self.prompt.dom.data.copy_(best["dom"])
        ctx.log(selected_epoch=best["epoch"], selected_val_acc=best["acc"])

    @torch.no_grad()
    def logits(self, x):
        """Target prediction: cosine to the target-domain prompts."""
        return x.to(self.device) @ self.text_features([self.target_row])[0].T

    def state_dict(self):
        return {"ctx": self.prompt.ctx.detach(), "dom": self.prompt.dom.detach(),
                "target_row": torch.tensor([self.target_row])}

    def load_state_dict(self, state):
        n_domains = state["dom"].shape[0]
        self.prompt = DomainPromptLearner(self.backbone, self.classnames, n_domains, self.cfg.n_ctx, self.cfg.n_dom_ctx, self.cfg.class_specific, 0)
        self.prompt.ctx.data.copy_(state["ctx"].to(self.device))
        self.prompt.dom.data.copy_(state["dom"].to(self.device))
        self.target_row = int(state["target_row"][0])
