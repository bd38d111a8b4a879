"""CoOp: Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022, https://arxiv.org/abs/2109.01134).

The prompt of class k is ``[SOS][V]_1 ... [V]_M [CLASS_k] . [EOS]``: M learnable context vectors
(shared by all classes, or one set per class: "class-specific context", CSC) replace the words of
a hand-written template. Image and text encoders stay frozen; the loss is the cross-entropy of
CLIP's cosine logits, ``p(y=k|x) = softmax_k(s · <f(x), g(t_k)>)``, s = CLIP's logit scale.

Because the image encoder is frozen, training reads cached image features: an epoch costs only
the text encoder, run on the C class prompts once per batch and truncated at the last EOS.
Defaults are the paper's: M = 16, random init N(0, 0.02²), SGD lr 0.002 (momentum 0.9, weight
decay 5e-4), batch 32, cosine schedule with one warm-up epoch at a constant 1e-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import MethodConfig
from .base import Method


@dataclass
class CoOpConfig(MethodConfig):
    name: str = "coop"
    n_ctx: int = 16  # M, the number of context vectors
    ctx_init: str = ""  # "" = random N(0, 0.02^2); or words ("a photo of a") to start from, n_ctx = their count
    class_specific: bool = False  # CSC: one context per class
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    batch_size: int = 32
    # The CoOp paper trains 50 epochs on ImageNet and 200 on the 16-shot benchmarks; for DG on whole
    # source domains (far more images than 16 shots) 50 is the paper's closest setting.
    epochs: int = 50
    warmup_epochs: int = 1  # constant learning rate warm-up (Dassl's ConstantWarmupScheduler)
    warmup_lr: float = 1.0e-5
    drop_last: bool = True  # Dassl's train loader drops the last incomplete batch
    select: str = "val"  # val: keep the epoch with the best source-validation accuracy | last


def warmup_cosine_lr(step: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float, warmup: str = "constant") -> float:
    """The learning rate at scheduler step ``step`` of Dassl's schedule, as the official CoOp, DAPL and
    DAPT code builds it (``build_lr_scheduler``: CosineAnnealingLR(T_max=epochs) behind a warm-up
    wrapper, WARMUP_RECOUNT=True):

    * steps ``< warmup_epochs``: ``warmup_lr`` (constant warm-up; a linear one starts at
      ``warmup_lr`` and rises as lr·step/warmup_epochs);
    * then the cosine restarts its count at 0: ``lr · (1 + cos(π (step − warmup_epochs) / epochs)) / 2``.

    So with one warm-up epoch, epoch 1 runs at the full rate and the last epoch is not at 0. Past
    ``epochs`` steps (DAPL's official code steps the scheduler once per batch) the cosine continues
    periodically, as PyTorch's CosineAnnealingLR does: the rate goes back up.
    """
    if step < warmup_epochs:
        return warmup_lr if (warmup == "constant" or step == 0) else lr * step / warmup_epochs
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup_epochs) / epochs))


def batch_starts(n: int, batch_size: int, drop_last: bool = True) -> range:
    """Start offsets of an epoch's batches over ``n`` items. Dassl's training loaders (the official
    CoOp, DAPL and DAPT code) drop the last incomplete batch when there is at least one full one."""
    end = (n // batch_size) * batch_size if (drop_last and n >= batch_size) else n
    return range(0, end, batch_size)


class PromptLearner(nn.Module):
    """Learnable context spliced between [SOS] and the class-name tokens of every class prompt."""

    def __init__(self, backbone, classnames: list[str], n_ctx: int, ctx_init: str, class_specific: bool):
        super().__init__()
        width = backbone.text_width
        if ctx_init:
            n_ctx = len(backbone.tokenizer.encode(ctx_init)) if hasattr(backbone.tokenizer, "encode") else n_ctx
            init_tokens = backbone.tokenize([ctx_init])
            with torch.no_grad():
                init = backbone.token_embedding(init_tokens)[0, 1 : 1 + n_ctx]  # (M, W)
            ctx = init.clone().repeat(len(classnames), 1, 1) if class_specific else init.clone()
        else:
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            ctx = torch.empty(shape).normal_(0, 0.02)
        self.ctx = nn.Parameter(ctx.to(backbone.device))  # (M, W) or (C, M, W)
        placeholder = " ".join(["X"] * n_ctx)
        tokens = backbone.tokenize([f"{placeholder} {name}." for name in classnames])  # (C, 77)
        self.eot = backbone.eot_positions(tokens)  # (C,)
        length = int(self.eot.max()) + 1  # nothing after the last EOS is ever used: do not keep it
        with torch.no_grad():
            emb = backbone.token_embedding(tokens[:, :length])  # (C, L, W)
        self.register_buffer("prefix", emb[:, :1].clone())  # [SOS]
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone())  # class tokens, ".", [EOS], padding
        self.n_ctx = n_ctx

    def forward(self) -> torch.Tensor:
        c = self.prefix.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(c, -1, -1)  # (C, M, W)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, L, W)


class CoOp(Method):
    Config = CoOpConfig

    def __init__(self, cfg, backbone, classnames, device):
        super().__init__(cfg, backbone, classnames, device)
        self.prompt = PromptLearner(backbone, classnames, cfg.n_ctx, cfg.ctx_init, cfg.class_specific)

    def class_features(self, prompt=None) -> torch.Tensor:
        """(C, D) normalised; ``prompt``: the module to run (training: its DDP wrapper), default self.prompt."""
        return self.backbone.encode_prompts((self.prompt if prompt is None else prompt)(), self.prompt.eot)

    def loss(self, x: torch.Tensor, y: torch.Tensor, prompt=None) -> torch.Tensor:
        logits = self.backbone.logit_scale * x @ self.class_features(prompt).T  # (B, C)
        return F.cross_entropy(logits, y)

    def lr_at(self, epoch: int) -> float:
        return warmup_cosine_lr(epoch, self.cfg.lr, self.cfg.epochs, self.cfg.warmup_epochs, self.cfg.warmup_lr)

    def fit(self, data, ctx):
        """Resume: a checkpoint after every epoch and, when a preemption signal comes, after the step
        in progress (it carries the step index; the epoch's order is seeded by (seed, epoch), so the
        resumed epoch skips the batches done). torchrun: each rank takes its shard of every batch,
        through the prompt learner in DDP (gradients summed, losses weighted by shard size)."""
        from ..engine import resume_point

        cfg = self.cfg
        opt = torch.optim.SGD([self.prompt.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        train = data["train"]
        x_all, y_all = train.x.to(self.device), train.y.to(self.device)
        best = {"acc": -1.0, "epoch": -1, "ctx": self.prompt.ctx.detach().clone()}
        state = ctx.load_checkpoint()
        start, done = resume_point(state)  # (epoch, its steps already done)
        loss_sum = 0.0  # the resumed epoch's train-loss sum before the stop
        if state is not None:
            self.prompt.ctx.data.copy_(state["ctx"])
            opt.load_state_dict(state["optimizer"])
            best = state["best"]
            loss_sum = state.get("loss_sum", 0.0) if done else 0.0
        prompt = ctx.ddp(self.prompt)  # the module itself on one process
        for epoch in ctx.progress(range(start, cfg.epochs), desc="coop epochs", initial=start, total=cfg.epochs):
            for g in opt.param_groups:
                g["lr"] = self.lr_at(epoch)
            order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(ctx.seed * 100003 + epoch))
            first = done if epoch == start else 0
            base, total = (loss_sum if first else 0.0), 0.0  # total: this rank's part since (re)start
            for step, i in enumerate(batch_starts(len(order), cfg.batch_size, cfg.drop_last)[first:], start=first):
                batch = order[i : i + cfg.batch_size]
                idx = ctx.shard(batch).to(self.device)
                if len(idx):
                    loss = ctx.batch_share(self.loss(x_all[idx], y_all[idx], prompt), len(idx), len(batch))
                else:  # a last batch smaller than the number of ranks: nothing here, DDP still syncs
                    loss = prompt().sum() * 0.0
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
                ctx.preempt_point(lambda: {"epoch": epoch, "step": step + 1, "ctx": self.prompt.ctx.detach(),
                                           "optimizer": opt.state_dict(), "best": best, "loss_sum": base + ctx.all_sum(total)})
            total = base + ctx.all_sum(total)
            val_acc = ctx.accuracy(self, data["val"])
            if cfg.select == "last" or val_acc > best["acc"]:
                best = {"acc": val_acc, "epoch": epoch, "ctx": self.prompt.ctx.detach().clone()}
            n_seen = len(batch_starts(len(order), cfg.batch_size, cfg.drop_last)) * cfg.batch_size
            ctx.log(epoch=epoch, lr=self.lr_at(epoch), train_loss=total / min(n_seen, len(order)), val_acc=val_acc)
            ctx.save_checkpoint({"epoch": epoch, "ctx": self.prompt.ctx.detach(), "optimizer": opt.state_dict(), "best": best})
        self.prompt.ctx.data.copy_(best["ctx"])
        ctx.log(selected_epoch=best["epoch"], selected_val_acc=best["acc"])

    @torch.no_grad()
    def logits(self, x):
        return x.to(self.device) @ self.class_features().T

    def state_dict(self):
        return {"ctx": self.prompt.ctx.detach()}

    def load_state_dict(self, state):
        self.prompt.ctx.data.copy_(state["ctx"].to(self.device))
