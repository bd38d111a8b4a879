"""CoOp: Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022, https://arxiv.org/abs/2109.01134; official code: KaiyangZhou/CoOp on Dassl).

The prompt of class k is ``[SOS][V]_1 ... [V]_M [CLASS_k] . [EOS]``: M learnable context vectors
(shared by all classes, or one set per class: "class-specific context", CSC) replace the words of
a hand-written template. Image and text encoders stay frozen; the loss is the cross-entropy of
CLIP's cosine logits, ``p(y=k|x) = softmax_k(s · <f(x), g(t_k)>)``, s = CLIP's logit scale.

Because the image encoder is frozen, an epoch's image features are computed once, before its
steps (``views.py``: the official fresh random crop + flip of every image in every epoch, or
promptdg's cheaper cached features, ``method.augment``), so a step costs only the text encoder,
and the shared ``[SOS][V]_1..[V]_M`` runs through it once, not once per class (``PromptGroups``:
only each class's name and [EOS] run per class). Defaults (conf/method/coop.yaml) are the official
ones: M = 16, random init N(0, 0.02²), SGD lr 0.002 (momentum 0.9, weight decay 5e-4), batch 32
(the last incomplete batch dropped), Dassl's cosine with one warm-up epoch at 1e-5, 50 / 100 / 200
epochs for 1 / 2-4 / 8-16 shots (50 on ImageNet), the last epoch kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation import accuracy
from ..prompt_encoding import PromptGroups
from ..schema import CoOpConfig
from ..training import Term, dassl_lr, shuffled_batches
from .base import Method


class PromptLearner(nn.Module):
    """Learnable context between [SOS] and the class-name tokens of every class prompt."""

    prefix: torch.Tensor  # (buffers)
    suffix: torch.Tensor

    def __init__(self, backbone, classnames: list[str], n_ctx: int, ctx_init: str, class_specific: bool):
        super().__init__()
        width = backbone.text_width
        if ctx_init:
            n_ctx = len(backbone.tokenizer.encode(ctx_init)) if hasattr(backbone.tokenizer, "encode") else n_ctx
            with torch.no_grad():
                init = backbone.token_embedding(backbone.tokenize([ctx_init]))[0, 1 : 1 + n_ctx]  # (M, W)
            ctx = init.clone().repeat(len(classnames), 1, 1) if class_specific else init.clone()
        else:
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            ctx = torch.empty(shape).normal_(0, 0.02)
        self.ctx = nn.Parameter(ctx.to(backbone.device))  # (M, W) or (C, M, W)
        tokens = backbone.tokenize([f"{' '.join(['X'] * n_ctx)} {name}." for name in classnames])  # (C, 77)
        self.eot = backbone.eot_positions(tokens)  # (C,)
        with torch.no_grad():  # nothing after the last EOS is ever used: not kept
            emb = backbone.token_embedding(tokens[:, : int(self.eot.max()) + 1])  # (C, L, W)
        self.register_buffer("prefix", emb[0, :1].clone())  # [SOS], (1, W)
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone())  # class tokens, ".", [EOS], padding
        self.n_ctx = n_ctx

    def forward(self) -> PromptGroups:
        """One group of C prompts: [SOS][ctx] shared (class-specific context: in each suffix)."""
        if self.ctx.dim() == 3:
            return PromptGroups.from_parts([self.prefix], [self.ctx, self.suffix], self.eot)
        return PromptGroups.from_parts([self.prefix, self.ctx], [self.suffix], self.eot)


class CoOp(Method):
    Config = CoOpConfig

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        self.prompt = PromptLearner(backbone, classnames, cfg.n_ctx, cfg.ctx_init, cfg.class_specific)

    def class_features(self) -> torch.Tensor:
        return self.backbone.encode_grouped(self.prompt())[0]  # (C, D) normalised

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE of CLIP's scaled cosines between image features x (B, D) and the class prompts' features."""
        return F.cross_entropy(self.backbone.logit_scale * x @ self.class_features().T, y)

    def fit(self, data, ctx):
        self.views, self.train_y = data.train_views, data.train.y.to(self.device)
        self.val = data.val
        ctx.train(self)

    def on_epoch(self, epoch, ctx):
        self.train_x = self.views.epoch(epoch).to(self.device)  # (N, D): this epoch's view of every image

    # ----------------------------------------------------------------- the loop's hooks
    def parameters_to_train(self):
        return [self.prompt.ctx]

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def lr(self, epoch, step, steps):
        c = self.cfg
        return dassl_lr(epoch, c.lr, c.epochs, c.warmup_epochs, c.warmup_lr)

    def epoch_batches(self, epoch, g):
        return shuffled_batches(len(self.train_y), self.cfg.batch_size, g, self.cfg.drop_last)

    def batch_loss(self, idx, info):
        idx = idx.to(self.device)
        return [Term("loss", self.loss(self.train_x[idx], self.train_y[idx]), len(idx))]

    def validate(self):
        return accuracy(self, self.val) if self.val is not None and len(self.val) else None

    # ----------------------------------------------------------------- inference and state
    @torch.no_grad()
    def logits(self, x):
        return x.to(self.device) @ self.class_features().T

    def state_dict(self):
        return {"ctx": self.prompt.ctx.detach()}

    def load_state_dict(self, state):
        self.prompt.ctx.data.copy_(state["ctx"].to(self.device))
