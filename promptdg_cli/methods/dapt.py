"""DAPT: Distribution-Aware Prompt Tuning (Cho et al., "Distribution-Aware Prompt Tuning for
Vision-Language Models", ICCV 2023, https://arxiv.org/abs/2309.03406).

Two prompts on a frozen CLIP: CoOp's 16 text context vectors (``PromptLearner`` of ``coop.py``)
and VPT's 16 visual prompt tokens after the image encoder's [CLS] token (``promptdg_cli/vpt.py``,
shallow by default, ``deep`` as an option). Beyond the cross-entropy of CLIP's cosine logits, DAPT
shapes the two embedding distributions:

* inter-dispersion of the normalised class text embeddings w̃ (pushes classes apart), t = 2:
      L_inter = mean_{m≠n} exp(-t ‖w̃_m − w̃_n‖²)
* intra-dispersion of the normalised image embeddings z̃ around their class prototype s_y, the
  mean zero-shot CLIP image embedding of class y's training shots, each shot seen once through the
  training transform, as the official prototype generator does (``renormalize_prototypes`` puts
  them back on the unit sphere). The paper writes L_intra = mean_i ‖z̃_i − s_{y_i}‖²; the official
  code computes ``F.mse_loss(z̃, s_y)``, the mean over all B·D elements, i.e. 1/D of the paper's
  form, and every official β_v (10 for Caltech101, 100 for DTD, ...) was tuned at that scale:
  with D = 512 the paper's form under the same β_v is 512 times stronger than what produced the
  published numbers. ``intra_loss: official`` (the default) is the code's scale, ``paper`` the
  equation's.

      L = CE + β_v · L_intra + β_t · L_inter

Because the visual prompts change the image features, DAPT trains through the image encoder on
images (random resized crop + flip, seeded per image and epoch) and re-encodes the test images
with the learned prompts; only the prototypes come from the cache.

Defaults per dataset (learning rate, β_v, β_t) are the official configs' values, written in the
dataset's YAML (``method_defaults.dapt``) and read by ``conf/method/dapt.yaml``; some look
surprising (a learning rate of 20 for DTD, EuroSAT, Food101, SUN397 and UCF101) but are the
official values: SGD on a few prompt vectors whose gradients are tiny. Datasets the official code
has no config for get the official code's own defaults, β_v = β_t = 0.1 (train.py), and CoOp's
learning rate 0.002. Epochs by shots, as the official script picks its config: 50 for 1 shot and
ImageNet, 100 for 2 and 4, 200 for 8 and 16. Batch 32, SGD, Dassl's warm-up + cosine schedule,
the last incomplete batch dropped. The model of the last epoch is kept, as in the official code.
The visual prompts start from VPT's uniform init drawn with the run's seed.

The few-shot protocol (``shots=k`` on a split-file dataset) and DomainBed-style data (leave-one-
domain-out, ``shots=k`` drawn from the source training split) both work; the engine draws the shots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..schema import MethodConfig
from ..vpt import VisualPrompts
from .base import Method
from .coop import PromptLearner, batch_starts, warmup_cosine_lr

# --------------------------------------------------------------------- the losses of the paper
def inter_dispersion_loss(text: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """L_inter = mean over ordered pairs m≠n of exp(-t ‖w̃_m − w̃_n‖²); text (C, D)."""
    w = F.normalize(text, dim=-1)
    d2 = (w.unsqueeze(0) - w.unsqueeze(1)).pow(2).sum(-1)  # (C, C)
    off = ~torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
    return torch.exp(-t * d2[off]).mean()


def intra_dispersion_loss(image: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, form: str = "official") -> torch.Tensor:
    """L_intra of normalised image embeddings around their class prototypes; image (B, D), prototypes (C, D).

    official: mean over the B·D elements of (z̃ − s_y)² (the official code's ``F.mse_loss``);
    paper: mean_i ‖z̃_i − s_{y_i}‖², D times the official value."""
    sq = (F.normalize(image, dim=-1) - prototypes[labels]).pow(2)  # (B, D)
    if form == "official":
        return sq.mean()
    if form == "paper":
        return sq.sum(-1).mean()
    raise ConfigError(f"method.intra_loss={form!r} is not a form of L_intra. Valid: official, paper")


def class_prototypes(x: torch.Tensor, y: torch.Tensor, n_classes: int, renormalize: bool) -> torch.Tensor:
    """Per-class mean of zero-shot image embeddings (C, D); a class without images gets zeros."""
    protos = torch.zeros(n_classes, x.shape[1], dtype=x.dtype)
    protos.index_add_(0, y, x)
    counts = torch.bincount(y, minlength=n_classes).clamp_min(1).unsqueeze(1).to(x.dtype)
    protos = protos / counts
    return F.normalize(protos, dim=-1) if renormalize else protos


@dataclass
class DAPTConfig(MethodConfig):
    name: str = "dapt"
    n_ctx: int = 16  # CoOp text context tokens
    n_visual: int = 16  # VPT prompt tokens
    deep: bool = False  # VPT-deep: new prompts at every block (the paper: shallow)
    lr: float = 0.002  # conf/method/dapt.yaml reads the dataset's official value
    beta_v: float = 0.1  # weight of L_intra
    beta_t: float = 0.1  # weight of L_inter
    intra_loss: str = "official"  # official: F.mse_loss (mean over B·D) | paper: mean over B of the squared norm
    t: float = 2.0  # L_inter's Gaussian potential
    renormalize_prototypes: bool = False
    epochs: int = 50  # conf/method/dapt.yaml: by shots, as the official script
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1.0e-5
    drop_last: bool = True  # Dassl's train loader drops the last incomplete batch
    augment: bool = True  # random resized crop + flip of the training images (Dassl's); false: the plain preprocessing


def _epoch_batches(paths, transform, batch_size: int, num_workers: int, seed: int, first: int, shard, drop_last: bool):
    """The epoch's batches of ``paths`` (already in the epoch's order) from batch ``first`` on, each
    cut to this rank's ``shard``: ``(positions in the epoch order, images, unreadable positions)``.
    An image's random augmentation is seeded by (seed, its position in the epoch order), so it is
    the same whichever rank loads it and whether or not the epoch was resumed (``image_batches``)."""
    from ..data import _collate, _ImageFiles

    n = len(paths)
    index = [list(shard(range(i, min(i + batch_size, n)))) for i in batch_starts(n, batch_size, drop_last)[first:]]
    return torch.utils.data.DataLoader(
        _ImageFiles(paths, transform, seed),
        batch_sampler=index,
        num_workers=num_workers if n > 4 * batch_size else 0,  # as image_batches: none for a handful of batches
        collate_fn=_collate,
    )


class DAPT(Method):
    Config = DAPTConfig
    needs_vit = True

    def __init__(self, cfg, backbone, classnames, device):
        super().__init__(cfg, backbone, classnames, device)
        self.prompt = PromptLearner(backbone, classnames, cfg.n_ctx, "", False)
        self.visual = VisualPrompts(backbone.model.visual, cfg.n_visual, cfg.deep, seed=0).to(device)

    def settings(self) -> dict:
        c = self.cfg
        return {"lr": c.lr, "beta_v": c.beta_v, "beta_t": c.beta_t, "epochs": c.epochs}

    def class_features(self) -> torch.Tensor:
        return self.backbone.encode_prompts(self.prompt(), self.prompt.eot, normalize=False)  # (C, D)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images.to(self.device))  # (B, D), unnormalised

    def loss(self, images, y, prototypes, beta_v, beta_t):
        z = self.image_features(images)
        w = self.class_features()
        logits = self.backbone.logit_scale * F.normalize(z, dim=-1) @ F.normalize(w, dim=-1).T
        ce = F.cross_entropy(logits, y)
        l_intra = intra_dispersion_loss(z, y, prototypes, self.cfg.intra_loss)
        l_inter = inter_dispersion_loss(w, self.cfg.t)
        return ce + beta_v * l_intra + beta_t * l_inter, ce, l_intra, l_inter

    def fit(self, data, ctx):
        """Epochs over images are long: when a preemption signal comes, training stops after the
        step in progress with a checkpoint that carries the step index; the resumed epoch loads only
        the remaining batches (the order is seeded by (seed, epoch), each image's augmentation by its
        position in it). torchrun: each rank loads and encodes its shard of every batch; the
        gradients of the two prompts are summed over ranks (``ctx.sync_grads``: two modules, the
        text prompts run once per step and the visual prompts on the images), each rank's loss
        weighted by its share of the images read in the step."""
        from ..data import augmented_transform
        from ..engine import resume_point

        cfg, s = self.cfg, self.settings()
        shots = data["train"]  # the engine has drawn the k shots per class (run key shots=k)
        self.visual.initialize(ctx.seed)  # VPT's init, drawn with the run's seed
        aug = augmented_transform(self.backbone.preprocess) if cfg.augment else self.backbone.preprocess
        protos = self.prototypes(shots, aug, ctx.seed).to(self.device)
        ctx.log(shots=len(shots), **s)
        params = [self.prompt.ctx, self.visual.prompts]
        opt = torch.optim.SGD(params, lr=s["lr"], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        state = ctx.load_checkpoint()
        start, done = resume_point(state)  # (epoch, its steps already done)
        resumed = (np.zeros(4), 0)
        if state is not None:
            self.prompt.ctx.data.copy_(state["ctx"])
            self.visual.prompts.data.copy_(state["visual"])
            opt.load_state_dict(state["optimizer"])
            if done:
                resumed = (state["sums"].cpu().double().numpy(), int(state["n"]))
        ctx.broadcast_params(params)  # torchrun: every rank starts from rank 0's prompts
        y_all = shots.y.to(self.device)
        for epoch in ctx.progress(range(start, s["epochs"]), desc="dapt epochs", initial=start, total=s["epochs"]):
            lr = warmup_cosine_lr(epoch, s["lr"], s["epochs"], cfg.warmup_epochs, cfg.warmup_lr, "constant")
            for g in opt.param_groups:
                g["lr"] = lr
            order = np.random.default_rng([ctx.seed, epoch]).permutation(len(shots))
            first = done if epoch == start else 0
            base_sums, base_n = resumed if first else (np.zeros(4), 0)
            batches = _epoch_batches([shots.paths[i] for i in order], aug, cfg.batch_size, self.num_workers,
                                     ctx.seed * 10007 + epoch, first, ctx.shard, cfg.drop_last)
            sums = np.zeros(4)  # this rank's part since (re)start
            n = 0  # steps with at least one image read (all ranks)
            for step, (pos, x, _) in enumerate(batches, start=first):  # an unreadable image is left out of its batch
                n_local = 0 if x is None else len(pos)
                n_global = ctx.all_sum(n_local)
                if n_global:
                    opt.zero_grad(set_to_none=True)
                    if n_local:
                        y = y_all[torch.as_tensor(order[pos.numpy()], device=self.device)]
                        terms = self.loss(x, y, protos, s["beta_v"], s["beta_t"])
                        loss, ce, l_intra, l_inter = (ctx.batch_share(t, n_local, n_global) for t in terms)
                        loss.backward()
                        sums += [loss.item(), ce.item(), l_intra.item(), l_inter.item()]
                    ctx.sync_grads(params)
                    opt.step()
                    n += 1
                ctx.preempt_point(lambda: {"epoch": epoch, "step": step + 1, "ctx": self.prompt.ctx.detach(),
                                           "visual": self.visual.prompts.detach(), "optimizer": opt.state_dict(),
                                           "sums": torch.from_numpy(base_sums + ctx.all_sum(sums)), "n": base_n + n})
            sums, n = base_sums + ctx.all_sum(sums), base_n + n
            ctx.log(epoch=epoch, lr=lr, **dict(zip(("loss", "ce", "l_intra", "l_inter"), (sums / n).tolist())))
            ctx.save_checkpoint({"epoch": epoch, "ctx": self.prompt.ctx.detach(), "visual": self.visual.prompts.detach(),
                                 "optimizer": opt.state_dict()})

    @torch.no_grad()
    def prototypes(self, shots, transform, seed: int) -> torch.Tensor:
        """The class prototypes (C, D): the official generator encodes every shot once through the
        training transform with the frozen encoder (no prompts) and averages the normalised
        features per class. Each shot's random augmentation is seeded by (seed, its position)."""
        from ..data import Features, image_batches

        if transform is self.backbone.preprocess:  # no augmentation: the cached features are these
            feats = shots
        else:
            xs, keep = [], []
            for pos, x, _ in image_batches(shots.paths, transform, 128, self.num_workers, seed=seed * 10007 + 99991):
                if x is not None:
                    xs.append(self.backbone.encode_image(x.to(self.device), normalize=True).float().cpu())
                    keep += pos.tolist()
            feats = Features(torch.cat(xs), shots.y[keep], [shots.domain[i] for i in keep], [shots.paths[i] for i in keep])
        return class_prototypes(feats.x, feats.y, len(self.classnames), self.cfg.renormalize_prototypes)

    # ----------------------------------------------------------------- evaluation on images
    @torch.no_grad()
    def features_for(self, feats, batch_size: int = 128):
        """Re-encode the images of ``feats`` with the learned visual prompts (cached features are
        the plain encoder's)."""
        from ..data import Features, image_batches

        out = []
        for _, x, bad in image_batches(feats.paths, self.backbone.preprocess, batch_size, self.num_workers):
            if bad:  # the cache already left out unreadable images; one that broke since is an error
                raise OSError(f"cannot read {feats.paths[bad[0]]} any more")
            out.append(F.normalize(self.image_features(x), dim=-1).cpu())
        return Features(torch.cat(out), feats.y, feats.domain, feats.paths)

    @torch.no_grad()
    def logits(self, x):
        return x.to(self.device) @ F.normalize(self.class_features(), dim=-1).T

    def state_dict(self):
        return {"ctx": self.prompt.ctx.detach(), "visual": self.visual.prompts.detach()}

    def load_state_dict(self, state):
        self.prompt.ctx.data.copy_(state["ctx"].to(self.device))
        self.visual.prompts.data.copy_(state["visual"].to(self.device))
