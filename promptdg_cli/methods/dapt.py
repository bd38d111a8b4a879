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

import torch
import torch.nn.functional as F

from .. import devices
from ..data import EpochLoader, Features, augmented_transform, image_batches, image_loader
from ..errors import ConfigError
from ..schema import DAPTConfig
from ..training import Term, dassl_lr, order_batches
from ..vpt import VisualPrompts
from .base import Method
from .coop import PromptLearner


# --------------------------------------------------------------------- the losses of the paper
def inter_dispersion_loss(text: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """L_inter = mean over ordered pairs m≠n of exp(-t ‖w̃_m − w̃_n‖²); text (C, D)."""
    w = F.normalize(text, dim=-1)
    d2 = (w.unsqueeze(0) - w.unsqueeze(1)).pow(2).sum(-1)  # (C, C)
    off = ~torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
    return torch.exp(-t * d2[off]).mean()


def intra_dispersion_loss(
    image: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, form: str = "official"
) -> torch.Tensor:
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


class DAPT(Method):
    Config = DAPTConfig
    needs_vit = True
    loss_terms = ("loss", "ce", "l_intra", "l_inter")  # L and its three terms (logged)

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        if str(cfg.augment) not in ("official", "none"):
            raise ConfigError(
                f"method.augment={cfg.augment} does not apply to DAPT, which trains through the image encoder "
                f"(visual prompts): no view can be cached. Valid: official, none"
            )
        self.prompt = PromptLearner(backbone, classnames, cfg.n_ctx, "", False)
        self.visual = VisualPrompts(backbone.model.visual, cfg.n_visual, cfg.deep, seed=self.env.seed).to(device)
        self.pool = EpochLoader(device)  # the training images' loader, its workers started once

    def class_features(self) -> torch.Tensor:
        return self.backbone.encode_grouped(self.prompt(), normalize=False)[0]  # (C, D)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images.to(self.device, non_blocking=True))  # (B, D), unnormalised

    def loss(self, images, y, prototypes):
        """L = CE + β_v · L_intra + β_t · L_inter, and its three terms."""
        c = self.cfg
        z, w = self.image_features(images), self.class_features()
        logits = self.backbone.logit_scale * F.normalize(z, dim=-1) @ F.normalize(w, dim=-1).T
        ce = F.cross_entropy(logits, y)
        l_intra = intra_dispersion_loss(z, y, prototypes, str(c.intra_loss))
        l_inter = inter_dispersion_loss(w, c.t)
        return ce + c.beta_v * l_intra + c.beta_t * l_inter, ce, l_intra, l_inter

    def fit(self, data, ctx):
        """Trains on the k shots per class the protocol drew (``shots=k``)."""
        self.shots = data.train
        self.visual.initialize(self.env.seed)  # VPT's init, drawn with the run's seed
        official = str(self.cfg.augment) == "official"  # none: promptdg's cheaper protocol (the plain transform)
        self.train_transform = augmented_transform(self.backbone.preprocess) if official else self.backbone.preprocess
        self.protos = self.prototypes(self.shots, self.train_transform).to(self.device)
        ctx.log(
            shots=len(self.shots),
            lr=self.cfg.lr,
            beta_v=self.cfg.beta_v,
            beta_t=self.cfg.beta_t,
            epochs=self.cfg.epochs,
        )
        ctx.train(self)

    # ----------------------------------------------------------------- the loop's hooks
    def parameters_to_train(self):
        return [self.prompt.ctx, self.visual.prompts]

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def lr(self, epoch, step, steps):
        c = self.cfg
        return dassl_lr(epoch, c.lr, c.epochs, c.warmup_epochs, c.warmup_lr)

    def epoch_batches(self, epoch, g):
        """Batches of positions in the epoch's order of the shots (an image's augmentation is seeded by
        its position, so it is the same whichever process loads it and after a resume)."""
        self.order = torch.randperm(len(self.shots), generator=g).numpy()
        return order_batches(torch.arange(len(self.order)), self.cfg.batch_size, self.cfg.drop_last)

    def load(self, epoch, batches):
        paths = [self.shots.paths[i] for i in self.order]
        return image_loader(paths, self.train_transform, [b.tolist() for b in batches], self.env.num_workers,
                            # (workers kept across epochs)
                            seed=self.env.seed_for("dapt-augmentation", epoch), device=self.device, pool=self.pool)

    def batch_loss(self, item, info):
        pos, x, _ = item  # an unreadable image is left out of its batch
        if x is None:
            return []
        y = self.shots.y[torch.as_tensor(self.order[pos.numpy()])].to(self.device)
        loss, *parts = self.loss(x, y, self.protos)
        n = len(pos)  # (the three terms are logged only: weight 0)
        return [Term("loss", loss, n)] + [
            Term(k, v.detach(), n, weight=0.0) for k, v in zip(("ce", "l_intra", "l_inter"), parts)
        ]

    # ----------------------------------------------------------------- prototypes and evaluation on images
    @torch.no_grad()
    def prototypes(self, shots, transform) -> torch.Tensor:
        """The class prototypes (C, D): the official generator encodes every shot once through the
        training transform with the frozen encoder (no prompts) and averages the normalised
        features per class. Each shot's random augmentation is seeded by (the run's seed, its position)."""
        if transform is self.backbone.preprocess:  # no augmentation: the cached features are these
            feats = shots
        else:
            xs, keep = [], []
            for pos, x, _ in image_batches(
                shots.paths,
                transform,
                128,
                self.env.num_workers,
                seed=self.env.seed_for("dapt-prototypes"),
                device=self.device,
            ):
                if x is not None:
                    with devices.autocast(self.device, self.env.precision):  # backbone.precision, as the feature cache
                        xs.append(
                            self.backbone.encode_image(x.to(self.device, non_blocking=True), normalize=True)
                            .float()
                            .cpu()
                        )
                    keep += pos.tolist()
            feats = Features(
                torch.cat(xs), shots.y[keep], [shots.domain[i] for i in keep], [shots.paths[i] for i in keep]
            )
        return class_prototypes(feats.x, feats.y, len(self.classnames), self.cfg.renormalize_prototypes)

    @torch.no_grad()
    def features_for(self, feats, batch_size: int = 128):
        """Re-encode the images of ``feats`` with the learned visual prompts (cached features are
        the plain encoder's)."""
        out = []
        for _, x, bad in image_batches(
            feats.paths, self.backbone.preprocess, batch_size, self.env.num_workers, device=self.device
        ):
            if bad:  # the cache already left out unreadable images; one that broke since is an error
                raise OSError(f"cannot read {feats.paths[bad[0]]} any more")
            with devices.autocast(self.device, self.env.precision):  # backbone.precision, as the feature cache
                out.append(F.normalize(self.image_features(x).float(), dim=-1).cpu())
        return Features(torch.cat(out), feats.y, feats.domain, feats.paths)

    @torch.no_grad()
    def logits(self, x):
        return x.to(self.device) @ F.normalize(self.class_features(), dim=-1).T

    def state_dict(self):
        return {"ctx": self.prompt.ctx.detach(), "visual": self.visual.prompts.detach()}

    def load_state_dict(self, state):
        self.prompt.ctx.data.copy_(state["ctx"].to(self.device))
        self.visual.prompts.data.copy_(state["visual"].to(self.device))
