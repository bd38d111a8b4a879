"""DAPL: Domain Adaptation via Prompt Learning (Ge et al., IEEE TNNLS 2023,
https://arxiv.org/abs/2202.06687; official code: LeapLabTHU/DAPrompt, trainers/dapl.py).

Unsupervised domain adaptation with frozen CLIP encoders. Every domain d of the run (each source
and the target) and every class k get a prompt whose domain-agnostic context ctx (M1 = 16 vectors,
shared by all classes, or one set per class: ``class_specific``) is shared by all domains, and
whose domain-specific context dom_d (M2 = 16 vectors) is shared by the classes of domain d:

    official (default):  [ctx_1 .. ctx_M1] [dom_d,1 .. dom_d,M2] {class_k} , a {domain d} image..
    paper (prompt=paper): [ctx_1 .. ctx_M1] [dom_d,1 .. dom_d,M2] {class_k}.

The official PromptLearner writes the domain's name after the class name; its text is built as
``"X ... X " + name + " " + ", a {domain} image." + "."``, so it ends with the BPE token "..":
kept as it is, since the published numbers came from those tokens. Domain names are written in
the dataset config's readable form (``dataset.domain_names``; "real world", not "real_world").
With t_{d,k} the normalised text feature of that prompt and s CLIP's logit scale (exp of the
learned log-scale, 100 for CLIP), an image x of domain d scores p_d(k | x) = softmax_k(s <x, t_{d,k}>).

Loss = CE over labelled source images, each against its own domain's prompts
     + U · CE over unlabelled target images against the target-domain prompts, with the zero-shot
       CLIP pseudo-label ŷ = argmax softmax(s <x, z_k> / T), z_k the feature of "a photo of a [class].",
       kept only where max softmax(s <x, z_k> / T) ≥ τ.
The target term is the mean over the kept images of a batch; a batch where none is kept adds 0
(the official code divides by the number kept and gives NaN). The pseudo-label of an image is
computed from the same (possibly augmented) view the target term sees, as the official code does.
The target is predicted with the target-domain prompts.

Schedule (official): Dassl's SGD with a 25-"epoch" cosine behind a one-step warm-up at 1e-5, but
the official trainer steps the scheduler after every batch, not every epoch: the rate follows
lr·(1 + cos(π (k − 1) / 25)) / 2 at batch k ≥ 1 and so cycles with a period of 50 batches through
the whole run. ``lr_step: epoch`` steps it once per epoch instead (a cosine over the 25 epochs, as
the paper describes it). Dassl drops the last incomplete source batch of an epoch; target batches
come from their own shuffled passes over the target, restarted when exhausted.

What differs from the official implementation, on purpose:
* any source→target pair, and several source domains at once (each with its own dom_d), chosen on
  the command line (``source=[...] target=...``), not one hard-coded pair per config file;
* model selection on a held-out 20 % of the labelled source data (or the last epoch), never on
  target labels (the official code keeps the epoch with the best target test accuracy): training
  sees the target's features without labels, and the engine keeps the labelled target for the
  final test only;
* the image encoder is frozen, so training reads cached image features; the official code
  augments every batch afresh (random resized crop + flip), ``aug_views`` K > 0 trains on K cached
  augmented views per image (one drawn per image and step), 0 on the un-augmented features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..schema import MethodConfig
from .base import Method
from .coop import batch_starts, warmup_cosine_lr
from .zeroshot import zeroshot_weights

@dataclass
class DAPLConfig(MethodConfig):
    name: str = "dapl"
    prompt: str = "official"  # official: "[ctx][dom] {class} , a {domain} image.." | paper: "[ctx][dom] {class}."
    n_ctx: int = 16  # M1, domain-agnostic context
    n_dom_ctx: int = 16  # M2, domain-specific context
    class_specific: bool = False  # one domain-agnostic context per class (the official VisDA-2017 RN101 setting)
    lr: float = 0.003
    lr_step: str = "batch"  # batch: the scheduler steps after every batch (official) | epoch
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    batch_size: int = 32  # source images per step
    target_batch_size: int = 32  # target images per step
    epochs: int = 25
    warmup_epochs: int = 1  # warm-up scheduler steps (official: linear, 1 step at warmup_lr)
    warmup_lr: float = 1.0e-5
    drop_last: bool = True  # Dassl's loaders drop the last incomplete batch
    T: float = 1.0  # temperature of the pseudo-label softmax
    tau: float = 0.6  # confidence threshold (conf/method/dapl.yaml: the dataset's value)
    U: float = 1.0  # weight of the target term
    pseudo_template: str = "a photo of a {}."
    aug_views: int = 0  # K cached augmented views per image; 0: the un-augmented features
    select: str = "val"  # val: best source-validation epoch | last


SUFFIXES = {
    "official": "{name} , a {domain} image..",  # the official PromptLearner's text after the context tokens
    "paper": "{name}.",
}


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
    """Prompts [SOS][ctx][dom_d] <suffix of (d, k)> for every domain d and class k, rows domain-major
    (d·C + k). The suffix is the class text (with the domain's words in the official form)."""

    def __init__(self, backbone, classnames: list[str], domain_words: list[str], n_ctx: int, n_dom_ctx: int,
                 class_specific: bool, seed: int, suffix: str = SUFFIXES["official"]):
        super().__init__()
        width, c, n_domains = backbone.text_width, len(classnames), len(domain_words)
        g = torch.Generator().manual_seed(seed)
        ctx_shape = (c, n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.empty(ctx_shape).normal_(0, 0.02, generator=g).to(backbone.device))
        self.dom = nn.Parameter(torch.empty(n_domains, n_dom_ctx, width).normal_(0, 0.02, generator=g).to(backbone.device))
        placeholder = " ".join(["X"] * (n_ctx + n_dom_ctx))
        texts = [f"{placeholder} {suffix.format(name=name, domain=word)}" for word in domain_words for name in classnames]
        tokens = backbone.tokenize(texts)  # (n_domains * C, 77)
        eot = backbone.eot_positions(tokens)
        length = int(eot.max()) + 1  # the truncated text path: nothing after the last EOS
        with torch.no_grad():
            emb = backbone.token_embedding(tokens[:, :length])
        self.register_buffer("prefix", emb[:c, :1].clone())  # [SOS]
        self.register_buffer("suffix", emb[:, 1 + n_ctx + n_dom_ctx :].clone().view(n_domains, c, -1, width))  # class ... [EOS]
        self.register_buffer("eot", eot.view(n_domains, c))
        self.n_classes, self.n_domains = c, n_domains

    def forward(self, domains: Optional[list[int]] = None) -> torch.Tensor:
        """Token embeddings (len(domains) * C, L, W) of the prompts of ``domains`` (default: all)."""
        c = self.n_classes
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(c, -1, -1)  # (C, M1, W)
        rows = []
        for d in range(self.n_domains) if domains is None else domains:
            dom = self.dom[d].unsqueeze(0).expand(c, -1, -1)  # (C, M2, W)
            rows.append(torch.cat([self.prefix, ctx, dom, self.suffix[d]], dim=1))
        return torch.cat(rows)


def domain_word(dataset_cfg_names: dict, domain: str) -> str:
    """The words a prompt uses for a domain folder: the dataset config's ``domain_names`` entry, else
    the folder name lower-cased with "_" as a space."""
    return str(dataset_cfg_names.get(domain) or domain.replace("_", " ").lower())


def target_batches(n: int, batch_size: int, steps: int, g: torch.Generator, drop_last: bool) -> list[torch.Tensor]:
    """``steps`` batches of target indices: shuffled passes over the n target images, a new pass
    when one is used up (the official trainer restarts its target loader), each pass cut into
    batches like Dassl's loader (the last incomplete batch dropped)."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i : i + batch_size] for i in batch_starts(n, batch_size, drop_last)]
    return out[:steps]


# --------------------------------------------------------------------- the method
class DAPL(Method):
    Config = DAPLConfig
    protocol = "uda"

    def __init__(self, cfg, backbone, classnames, device):
        super().__init__(cfg, backbone, classnames, device)
        self.prompt: Optional[DomainPromptLearner] = None  # built when the run's domains are known
        self.domains: list[str] = []
        self.words: list[str] = []
        self.target_row = -1

    def setup(self, domains: list[str], target: str, seed: int, words: Optional[list[str]] = None) -> None:
        """Prompts for ``domains`` (sources then target, written as ``words``); row ``target_row`` predicts."""
        cfg = self.cfg
        if cfg.prompt not in SUFFIXES:
            raise ConfigError(f"method.prompt={cfg.prompt!r} is not a DAPL prompt form. Valid: {', '.join(SUFFIXES)}")
        self.domains, self.target_row = list(domains), list(domains).index(target)
        self.words = list(words) if words is not None else [domain_word({}, d) for d in domains]
        self.prompt = DomainPromptLearner(self.backbone, self.classnames, self.words, cfg.n_ctx, cfg.n_dom_ctx,
                                          cfg.class_specific, seed, SUFFIXES[cfg.prompt])

    def text_features(self, domains: Optional[list[int]] = None, prompt=None) -> torch.Tensor:
        """(n, C, D) normalised features of the prompts of ``domains`` (default: all), one text batch;
        ``prompt``: the module to run (training: its DDP wrapper), default self.prompt."""
        idx = list(range(self.prompt.n_domains)) if domains is None else domains
        eot = self.prompt.eot[idx].reshape(-1)
        f = self.backbone.encode_prompts((self.prompt if prompt is None else prompt)(idx), eot)
        return f.view(len(idx), self.prompt.n_classes, -1)

    def lr_at(self, step: int) -> float:
        """The rate at scheduler step ``step`` (a batch with lr_step=batch, an epoch with lr_step=epoch)."""
        cfg = self.cfg
        return warmup_cosine_lr(step, cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, "linear")

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
        if cfg.lr_step not in ("batch", "epoch"):
            raise ConfigError(f"method.lr_step={cfg.lr_step!r}. Valid: batch (official), epoch")
        train, target = data["train"], data["target"]
        assert bool((target.y < 0).all()), "UDA training must not see target labels"
        sources = list(dict.fromkeys(train.domain))
        domains = sources + [target.domain[0]]
        self.setup(domains, target.domain[0], ctx.seed, [domain_word(ctx.domain_names, d) for d in domains])
        tau = cfg.tau
        dev = self.device
        # views: (V, N, D); view 0 is the un-augmented feature, used when aug_views = 0
        xs = data["train_views"].to(dev) if "train_views" in data else train.x.to(dev)[None]
        xt = data["target_views"].to(dev) if "target_views" in data else target.x.to(dev)[None]
        ys = train.y.to(dev)
        ds = torch.tensor([self.domains.index(d) for d in train.domain], device=dev)
        scale = self.backbone.logit_scale
        with torch.no_grad():  # zero-shot pseudo-labels of every view of every target image, (V, N)
            zs = zeroshot_weights(self.backbone, self.classnames, [cfg.pseudo_template])
            pseudo, keep = pseudo_labels(scale * xt @ zs.T, cfg.T, tau)
        ctx.log(pseudo_labels_kept=int(keep[0].sum()), target_images=keep.shape[1], tau=tau)

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
        starts = batch_starts(n_src, cfg.batch_size, cfg.drop_last)
        steps = len(starts)
        for epoch in ctx.progress(range(start, cfg.epochs), desc="dapl epochs", initial=start, total=cfg.epochs):
            g = torch.Generator().manual_seed(ctx.seed * 100003 + epoch)
            order_s = torch.randperm(n_src, generator=g).to(dev)
            order_t = target_batches(n_tgt, cfg.target_batch_size, steps, g, cfg.drop_last)
            view_s = torch.randint(xs.shape[0], (n_src,), generator=g).to(dev)
            view_t = torch.randint(xt.shape[0], (n_tgt,), generator=g).to(dev)
            first = done if epoch == start else 0
            base = resumed_sums if first else torch.zeros(4, dtype=torch.float64)  # loss, l_src, l_tgt, kept
            sums = torch.zeros(4, dtype=torch.float64)  # this rank's part since (re)start
            for b, i in enumerate(starts[first:], start=first):
                lr = self.lr_at(epoch * steps + b if cfg.lr_step == "batch" else epoch)
                for grp in opt.param_groups:
                    grp["lr"] = lr
                si_all = order_s[i : i + cfg.batch_size]
                tj_all = order_t[b].to(dev)
                si, tj = ctx.shard(si_all), ctx.shard(tj_all)
                text = self.text_features(prompt=prompt)
                vt = view_t[tj]
                if len(si):
                    _, l_src, l_tgt = dapl_loss(
                        text, scale,
                        xs[view_s[si], si], ds[si], ys[si],
                        xt[vt, tj], self.target_row, pseudo[vt, tj], keep[vt, tj], cfg.U,
                    )
                else:  # a last source batch smaller than the number of ranks
                    l_src = text.sum() * 0.0
                    l_tgt = masked_cross_entropy(scale * xt[vt, tj] @ text[self.target_row].T, pseudo[vt, tj], keep[vt, tj])
                l_src = ctx.batch_share(l_src, len(si), len(si_all))
                l_tgt = ctx.batch_share(l_tgt, int(keep[vt, tj].sum()), int(keep[view_t[tj_all], tj_all].sum()))
                loss = l_src + cfg.U * l_tgt
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += torch.tensor([loss.item(), l_src.item(), l_tgt.item(), int(keep[vt, tj].sum())], dtype=torch.float64)
                ctx.preempt_point(lambda: {"epoch": epoch, "step": b + 1, "ctx": self.prompt.ctx.detach(), "dom": self.prompt.dom.detach(),
                                           "optimizer": opt.state_dict(), "best": best, "sums": base + ctx.all_sum(sums)})
            sums = (base + ctx.all_sum(sums)).tolist()
            val_acc = self.source_accuracy(data["val"]) if len(data["val"]) else float("nan")
            val_acc = ctx.broadcast(val_acc)  # every rank selects the same epoch
            if cfg.select == "last" or not len(data["val"]) or val_acc > best["acc"]:
                best = {"acc": val_acc, "epoch": epoch, "ctx": self.prompt.ctx.detach().clone(), "dom": self.prompt.dom.detach().clone()}
            ctx.log(epoch=epoch, lr=lr, loss=sums[0] / steps, l_src=sums[1] / steps,
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
        words = "\n".join(self.words).encode()
        return {"ctx": self.prompt.ctx.detach(), "dom": self.prompt.dom.detach(),
                "target_row": torch.tensor([self.target_row]), "domain_words": torch.tensor(list(words), dtype=torch.uint8)}

    def load_state_dict(self, state):
        n_domains = state["dom"].shape[0]
        words = bytes(state["domain_words"].tolist()).decode().split("\n") if "domain_words" in state else [f"domain {i}" for i in range(n_domains)]
        self.words, self.target_row = words, int(state["target_row"][0])
        self.prompt = DomainPromptLearner(self.backbone, self.classnames, words, self.cfg.n_ctx, self.cfg.n_dom_ctx,
                                          self.cfg.class_specific, 0, SUFFIXES[self.cfg.prompt])
        self.prompt.ctx.data.copy_(state["ctx"].to(self.device))
        self.prompt.dom.data.copy_(state["dom"].to(self.device))
