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
kept as it is, since the published numbers came from those tokens. Domain names are written as the
dataset config's ``domain_names`` give them: the official code writes Dassl's folder names
("real_world" on Office-Home, as conf/dataset/officehome.yaml maps it); a domain not listed is
written as its folder name lower-cased, "_" as a space.
With t_{d,k} the normalised text feature of that prompt and s CLIP's logit scale (exp of the
learned log-scale, 100 for CLIP), an image x of domain d scores p_d(k | x) = softmax_k(s <x, t_{d,k}>).

Loss = CE over labelled source images, each against its own domain's prompts
     + U · CE over unlabelled target images against the target-domain prompts, with the zero-shot
       CLIP pseudo-label ŷ = argmax softmax(s <x, z_k> / T), z_k the feature of "a photo of a [class].",
       kept only where max softmax(s <x, z_k> / T) ≥ τ.
The target term is the mean over the kept images of a batch; a batch where none is kept adds 0
(the official code divides by the number kept and gives NaN, which its fp16 GradScaler answers by
skipping the whole step). The pseudo-label of an image is computed from the same augmented view the
target term sees, as the official code does. The target is predicted with the target-domain prompts.

Schedule (official): Dassl's SGD with a 25-"epoch" cosine behind a one-step warm-up at 1e-5, but
the official trainer steps the scheduler after every batch, not every epoch: the rate follows
lr·(1 + cos(π (k − 1) / 25)) / 2 at batch k ≥ 1 and so cycles with a period of 50 batches through
the whole run. ``lr_step: epoch`` steps it once per epoch instead (a cosine over the 25 epochs, as
the paper describes it). Dassl drops the last incomplete source batch of an epoch; target batches
come from their own shuffled passes over the target, restarted when exhausted.

Data and augmentation, as the official trainer: every source image trains (``source_holdout``
false), each epoch sees a fresh random resized crop + flip of every source and target image
(``augment: official``, ``views.py``; the target loader restarts within an epoch when the target
is smaller, and each pass draws new views), and the encoder being frozen, an epoch's views are
encoded once before its steps. ``augment: views`` / ``none`` are promptdg's cheaper protocols.

What differs from the official implementation, on purpose:
* any source→target pair, and several source domains at once (each with its own dom_d), chosen on
  the command line (``source=[...] target=...``), not one hard-coded pair per config file;
* the last epoch is kept; the official code keeps the epoch with the best target *test* accuracy,
  a leak that exists here only as the opt-in ``select=target_test`` (recorded, marked in tables).
  ``source_holdout=true`` with ``select=val`` selects on a held-out 20 % of the source instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..prompt_encoding import PromptGroups
from ..schema import DAPLConfig
from ..training import Term, dassl_lr, order_batches
from ..views import concat_passes
from .base import Method

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
    """Prompts [SOS][ctx][dom_d] <suffix of (d, k)> for every domain d and class k. The suffix is the
    class text (with the domain's words in the official form)."""

    prefix: torch.Tensor  # (buffers)
    suffix: torch.Tensor
    eot: torch.Tensor

    def __init__(self, backbone, classnames: list[str], domain_words: list[str], n_ctx: int, n_dom_ctx: int,
                 class_specific: bool, seed: int, suffix: str = SUFFIXES["official"]):
        super().__init__()
        width, c, n_domains = backbone.text_width, len(classnames), len(domain_words)
        g = torch.Generator().manual_seed(seed)
        ctx_shape = (c, n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.empty(ctx_shape).normal_(0, 0.02, generator=g).to(backbone.device))
        self.dom = nn.Parameter(
            torch.empty(n_domains, n_dom_ctx, width).normal_(0, 0.02, generator=g).to(backbone.device)
        )
        placeholder = " ".join(["X"] * (n_ctx + n_dom_ctx))
        texts = [
            f"{placeholder} {suffix.format(name=name, domain=word)}" for word in domain_words for name in classnames
        ]
        tokens = backbone.tokenize(texts)  # (n_domains * C, 77)
        eot = backbone.eot_positions(tokens)
        with torch.no_grad():  # the truncated text path: nothing after the last EOS
            emb = backbone.token_embedding(tokens[:, : int(eot.max()) + 1])
        self.register_buffer("prefix", emb[0, :1].clone())  # [SOS], (1, W)
        # class ... [EOS]
        self.register_buffer("suffix", emb[:, 1 + n_ctx + n_dom_ctx :].clone().view(n_domains, c, -1, width))
        self.register_buffer("eot", eot.view(n_domains, c))
        self.n_classes, self.n_domains = c, n_domains

    def forward(self, domains: Optional[list[int]] = None) -> PromptGroups:
        """The prompts of ``domains`` (default: all), one group per domain: [SOS][ctx][dom_d] is shared by
        the domain's classes (with class-specific context only [SOS] is, the rest is in each suffix)."""
        idx = list(range(self.n_domains)) if domains is None else list(domains)
        # (G, M2, W), (G, C, S, W), (G, C); all domains: the tensors themselves (the EOT's facts are read once)
        dom, suffix, eot = (
            (self.dom, self.suffix, self.eot) if domains is None else (self.dom[idx], self.suffix[idx], self.eot[idx])
        )
        if self.ctx.dim() == 3:
            dom_c = dom.unsqueeze(1).expand(-1, self.n_classes, -1, -1)  # (G, C, M2, W)
            return PromptGroups.from_parts([self.prefix], [self.ctx, dom_c, suffix], eot)
        return PromptGroups.from_parts([self.prefix, self.ctx, dom], [suffix], eot)


def domain_word(dataset_cfg_names: dict, domain: str) -> str:
    """The words a prompt uses for a domain folder: the dataset config's ``domain_names`` entry, else
    the folder name lower-cased with "_" as a space."""
    return str(dataset_cfg_names.get(domain) or domain.replace("_", " ").lower())


def target_batches(n: int, batch_size: int, steps: int, g: torch.Generator, drop_last: bool) -> list[torch.Tensor]:
    """``steps`` batches of target rows: shuffled passes over the n target images, a new pass when one
    is used up (the official trainer restarts its target loader, whose transform draws new views),
    each pass cut into batches like Dassl's loader (the last incomplete batch dropped). Image i of
    pass p is row ``p * n + i`` (the rows of :func:`views.concat_passes`)."""
    out: list[torch.Tensor] = []
    p = 0
    while len(out) < steps:
        out += [b + p * n for b in order_batches(torch.randperm(n, generator=g), batch_size, drop_last)]
        p += 1
    return out[:steps]


def target_passes(n: int, batch_size: int, steps: int, drop_last: bool) -> int:
    """How many passes over the n target images ``steps`` target batches take."""
    per_pass = len(order_batches(torch.arange(n), batch_size, drop_last))
    return max(1, -(-steps // per_pass))


# --------------------------------------------------------------------- the method
class DAPL(Method):
    Config = DAPLConfig
    protocol = "uda"
    loss_terms = ("l_src", "l_tgt")  # the source CE and the target term (its mean over the kept images)

    def __init__(self, cfg, backbone, classnames, device, env=None) -> None:
        super().__init__(cfg, backbone, classnames, device, env)
        self.prompt: Optional[DomainPromptLearner] = None  # built when the run's domains are known
        self.domains: list[str] = []
        self.words: list[str] = []
        self.target_row = -1

    def setup(self, domains: list[str], target: str, seed: int, words: Optional[list[str]] = None) -> None:
        """Prompts for ``domains`` (sources then target, written as ``words``); row ``target_row`` predicts."""
        cfg = self.cfg
        if str(cfg.prompt) not in SUFFIXES:
            raise ConfigError(f"method.prompt={cfg.prompt!r} is not a DAPL prompt form. Valid: {', '.join(SUFFIXES)}")
        self.domains, self.target_row = list(domains), list(domains).index(target)
        self.words = list(words) if words is not None else [domain_word({}, d) for d in domains]
        self.prompt = DomainPromptLearner(self.backbone, self.classnames, self.words, cfg.n_ctx, cfg.n_dom_ctx,
                                          cfg.class_specific, seed, SUFFIXES[str(cfg.prompt)])

    def text_features(self, domains: Optional[list[int]] = None) -> torch.Tensor:
        """(n, C, D) normalised features of the prompts of ``domains`` (default: all)."""
        assert self.prompt is not None  # (setup() comes first)
        return self.backbone.encode_grouped(self.prompt(domains))

    @torch.no_grad()
    def source_accuracy(self, feats) -> float:
        """Accuracy of source images, each scored with its own domain's prompts (model selection)."""
        text = self.text_features()
        rows = torch.tensor([self.domains.index(d) for d in feats.domain], device=self.device)
        pred = torch.einsum("bd,bkd->bk", feats.x.to(self.device), text[rows]).argmax(-1).cpu()
        return round(100 * (pred == feats.y).float().mean().item(), 4)

    def fit(self, data, ctx):
        train, target = data.train, data.target
        assert bool((target.y < 0).all()), "UDA training must not see target labels"
        domains = list(dict.fromkeys(train.domain)) + [target.domain[0]]
        self.setup(domains, target.domain[0], self.env.seed, [domain_word(self.env.domain_names, d) for d in domains])
        self.src_views, self.tgt_views = data.train_views, data.target_views  # what each epoch sees (views.py)
        self.ys = train.y.to(self.device)
        self.ds = torch.tensor([self.domains.index(d) for d in train.domain], device=self.device)
        # (C, D) pseudo-labels' prompts
        self.zs = self.backbone.zeroshot_weights(self.classnames, [self.cfg.pseudo_template])
        self.val = data.val
        ctx.train(self)

    # ----------------------------------------------------------------- the loop's hooks
    def parameters_to_train(self):
        return [self.prompt.ctx, self.prompt.dom]

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def lr(self, epoch, step, steps):
        """The official trainer steps the scheduler after every batch (lr_step=batch); epoch: once per epoch."""
        c = self.cfg
        return dassl_lr(
            epoch * steps + step if str(c.lr_step) == "batch" else epoch,
            c.lr,
            c.epochs,
            c.warmup_epochs,
            c.warmup_lr,
            "linear",
        )

    def on_epoch(self, epoch, ctx):
        """The epoch's views of the source images and of every pass over the target, and the zero-shot
        pseudo-labels of each target view (computed on the view the target term sees)."""
        c = self.cfg
        steps = len(order_batches(torch.arange(len(self.ys)), c.batch_size, c.drop_last))
        passes = target_passes(self.tgt_views.n, c.target_batch_size, steps, c.drop_last)
        self.xs = self.src_views.epoch(epoch).to(self.device)  # (N, D)
        self.xt = concat_passes(self.tgt_views, epoch, passes).to(self.device)  # (passes * M, D)
        with torch.no_grad():
            self.pseudo, self.keep = pseudo_labels(self.backbone.logit_scale * self.xt @ self.zs.T, c.T, c.tau)
        ctx.log(pseudo_epoch=epoch, pseudo_labels_kept=int(self.keep.sum()), target_views=len(self.keep), tau=c.tau)

    def epoch_batches(self, epoch, g):
        """(source batch, target batch) pairs: the source images in a seeded order, target batches
        from their own passes (rows of the epoch's target views)."""
        c = self.cfg
        source = order_batches(torch.randperm(len(self.ys), generator=g), c.batch_size, c.drop_last)
        target = target_batches(self.tgt_views.n, c.target_batch_size, len(source), g, c.drop_last)
        return list(zip(source, target))

    def batch_loss(self, item, info):
        si, tj = (t.to(self.device) for t in item)
        text, scale = self.text_features(), self.backbone.logit_scale  # (n_domains, C, D)
        x_tgt, pseudo, keep = self.xt[tj], self.pseudo[tj], self.keep[tj]
        if len(si):
            _, l_src, l_tgt = dapl_loss(
                text, scale, self.xs[si], self.ds[si], self.ys[si], x_tgt, self.target_row, pseudo, keep, self.cfg.U
            )
        else:  # a batch of target images only
            l_src, l_tgt = None, masked_cross_entropy(scale * x_tgt @ text[self.target_row].T, pseudo, keep)
        return [Term("l_src", l_src, len(si)), Term("l_tgt", l_tgt, int(keep.sum()), self.cfg.U)]

    def validate(self):
        return self.source_accuracy(self.val) if self.val is not None and len(self.val) else None

    # ----------------------------------------------------------------- inference and state
    @torch.no_grad()
    def logits(self, x):
        """Target prediction: cosine to the target-domain prompts."""
        return x.to(self.device) @ self.text_features([self.target_row])[0].T

    def state_dict(self):
        words = "\n".join(self.words).encode()
        return {
            "ctx": self.prompt.ctx.detach(),
            "dom": self.prompt.dom.detach(),
            "target_row": torch.tensor([self.target_row]),
            "domain_words": torch.tensor(list(words), dtype=torch.uint8),
        }

    def load_state_dict(self, state):
        n_domains = state["dom"].shape[0]
        words = (
            bytes(state["domain_words"].tolist()).decode().split("\n")
            if "domain_words" in state
            else [f"domain {i}" for i in range(n_domains)]
        )
        self.words, self.target_row = words, int(state["target_row"][0])
        self.prompt = DomainPromptLearner(self.backbone, self.classnames, words, self.cfg.n_ctx, self.cfg.n_dom_ctx,
                                          self.cfg.class_specific, 0, SUFFIXES[str(self.cfg.prompt)])
        self.prompt.ctx.data.copy_(state["ctx"].to(self.device))
        self.prompt.dom.data.copy_(state["dom"].to(self.device))
