"""DomainFusion (Huang et al., "DomainFusion: Generalizing To Unseen Domains with Latent Diffusion
Models", ECCV 2024). There is no public code; this follows the paper's description, and every
choice the paper leaves open is listed below with its default and the reason.

The DG model is the paper's: DomainBed's ERM (``methods/erm.py``: an ImageNet ResNet-50 featurizer
and a linear head, Adam 5e-5, 32 images of each source domain a step, 5,001 steps, DomainBed's
augmentation, split and selection), and one frozen latent diffusion model (LDM) adds two things:

1. **Latent distillation.** Each distilled image is darkened by the classifier's confidence in its
   label, x(θ) = p_θ(y|x) · x, encoded by the VAE, z(θ) = E(x(θ)), and noised at a random timestep,
   z_t = sqrt(ᾱ_t) z + sqrt(1 − ᾱ_t) ε. The frozen UNet, prompted with "a photo of a [class]",
   predicts ε̂. The loss is the score-distillation surrogate

       L_LD = mean_b Σ_j sg[w(t) (ε̂ − ε)]_bj · z(θ)_bj,     ∂L_LD/∂z = w(t)(ε̂ − ε) / B,

   so the gradient reaches θ through z(θ) → x(θ) → p_θ and never through the UNet (ε̂ is computed
   under ``no_grad`` and detached; no LDM weight requires a gradient).

2. **Online lightweight augmentation.** Every T evaluation periods each image of the current
   synthetic set (at first: copies of source training images) yields N img2img candidates from the
   LDM. Each candidate latent is split into a style (channel-wise mean and std) and a content (the
   latent normalised by them); the style farthest from the input's and the content closest to the
   input's are fused, AdaIN-style, into the image that replaces the input: content* · σ_style + μ_style.

    L = CE(the step's source and synthetic draws) + λ · L_LD

With a CLIP backbone (``backbone=rn50``, ``demo_clip``, ...) the featurizer is CLIP's image encoder and
the head starts as zero-shot CLIP (``zeroshot_template``, CLIP's temperature): the CLIP-encoder
variant; ``train_encoder`` false keeps that encoder frozen (cached features: no augmentation).

Choices the paper leaves open (config key, default, why):

* ``ldm`` auto: the demo LDM with the demo CLIP, else Stable Diffusion v1.5
  (``stable-diffusion-v1-5/stable-diffusion-v1-5``): the most used SD 1.x checkpoint; the paper
  uses an off-the-shelf SD without fine-tuning. Any SD 1.x/2.x folder or hub id works.
* ``ldm_resolution`` null: the LDM's own size (SD v1.5: its native 512 px; the demo LDM: 32 px);
  ``method=domainfusion_256`` is the named cheaper option (a quarter of the UNet's cost).
* ``style_space`` latent: style and content are computed on the VAE latents of the candidates, so a
  candidate is never decoded; only the fused image is (one VAE decode per kept image).
* Style distance: L2 between the concatenated (μ, σ) vectors; content distance: L2 between the
  normalised latents.
* ``prompt`` "a photo of a {}" for both distillation and img2img, as the paper's class prompt.
* ``distill_weight`` λ = 1, ``t_range`` [0.02, 0.98] of the training timesteps and w(t) = 1 − ᾱ_t
  (DreamFusion's score-distillation defaults), ``distill_guidance`` 7.5 (SD's usual CFG scale; real
  images need far less than DreamFusion's 100), on ``distill_per_step`` 8 source draws of each step,
  spread evenly over the source domains' minibatches (the VAE backward pass is the expensive part);
  each distilled draw's t and ε come from its own seed, so ranks and a resumed step draw the same.
* x(θ) darkens the image's plain pixels in [0, 1] at the LDM's size (black is 0), then maps them to
  the LDM's [-1, 1]; the classifier sees the draw's augmented view.
* The latent of x(θ) is the VAE posterior mean (deterministic; the sample's noise adds nothing the
  diffusion noise does not).
* The synthetic set is one more minibatch of ``batch_size`` draws in every step (a further
  environment of the ERM step): the source domains' minibatches stay DomainBed's, and a small
  synthetic set (DomainNet's) still reaches every step.
* ``augment_every`` T = 5 evaluation periods (CHECKPOINT_FREQ 300: rounds before steps 1,201, 2,701
  and 4,201; DomainNet's dataset default is 2 of its 1,000-step periods), ``candidates`` N = 4,
  ``strength`` 0.5 with 20 DDIM steps (10 run), ``img2img_guidance`` 7.5; ``synthetic_fraction`` 1.0
  (every source training image has a synthetic copy; DomainNet: see
  conf/experiment/domainfusion_domainnet.yaml). A round's inputs are the current synthetic images, so
  variation accumulates over rounds.
* The generated-image count (``generated_images`` in results.json) counts LDM img2img candidates,
  the figure that compares to offline augmentation; ``synthetic_images`` counts fused images.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import devices, plugins, seeds
from ..classifier import Featurizer, augment_transform
from ..data import image_batches
from ..errors import ConfigError
from ..ldm import check_finite, load_ldm, to_ldm_pixels
from ..schema import DomainFusionConfig
from ..synthetic import ldm_pixels, round_outputs, round_seed, write_round
from ..training import Term
from .erm import ERM

SD_DEFAULT = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --------------------------------------------------------------------- the two parts of the paper
def distill_weighting(alphas_cumprod: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """w(t) per sample, (B,)."""
    if kind == "1-alpha":
        return 1 - alphas_cumprod[t]
    if kind == "constant":
        return torch.ones_like(alphas_cumprod[t])
    raise ConfigError(f"method.weighting={kind!r} is not a weighting. Valid: 1-alpha, constant")


def darken(x01: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x(θ) = p_θ(y|x) · x on [0, 1] pixels; p (B,) carries the gradient to θ."""
    return p.view(-1, 1, 1, 1) * x01


def latent_distillation_loss(
    ldm,
    p: torch.Tensor,
    x01: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    guidance: float,
    weighting: str = "1-alpha",
    where: str = "latent distillation",
):
    """L_LD of a batch and its latent gradient g = w(t)(ε̂ − ε).

    p: (B,) the classifier's probability of each image's label (differentiable); x01: (B, 3, R, R)
    pixels in [0, 1]; cond: (B, L, D) the class prompts' text states; t: (B,) timesteps; noise: the
    ε of the forward process, shaped like the latents. Returns (loss, g) with ∂loss/∂z = g / B; a g
    that is not finite (an LDM out of fp16's range) stops the run, naming ``where``.
    """
    z = ldm.encode(to_ldm_pixels(darken(x01, p)))  # (B, c, h, w): gradient flows to p
    with torch.no_grad():
        z_t = ldm.add_noise(z.detach(), noise, t)
        eps_hat = ldm.predict_noise(z_t, t, cond, guidance)
        w = distill_weighting(ldm.alphas_cumprod(), t, weighting).view(-1, 1, 1, 1)
        g = check_finite(w * (eps_hat - noise), f"{where}: the latent gradient w(t)(ε̂ − ε)", ldm.dtype)
    loss = (g * z).flatten(1).sum(1).mean()
    return loss, g


def style_content(z: torch.Tensor, eps: float = 1e-5):
    """Channel-wise style (μ, σ), each (..., c, 1, 1), and content (z − μ)/σ of latents (..., c, h, w)."""
    mu = z.mean(dim=(-2, -1), keepdim=True)
    sigma = z.var(dim=(-2, -1), keepdim=True, unbiased=False).add(eps).sqrt()
    return mu, sigma, (z - mu) / sigma


def fuse_candidates(z_in: torch.Tensor, cands: torch.Tensor):
    """The style farthest from the input's and the content closest to it, fused (AdaIN).

    z_in: (B, c, h, w) the inputs' latents; cands: (N, B, c, h, w) the candidates' latents.
    Returns (fused (B, c, h, w), style index (B,), content index (B,)).
    """
    mu0, s0, c0 = style_content(z_in)
    mu, s, c = style_content(cands)
    style_vec = torch.cat([mu, s], dim=-3).flatten(2)  # (N, B, 2c)
    style_d = (style_vec - torch.cat([mu0, s0], dim=-3).flatten(1)).norm(dim=-1)  # (N, B)
    content_d = (c - c0).flatten(2).norm(dim=-1)  # (N, B)
    si, ci = style_d.argmax(0), content_d.argmin(0)  # (B,)
    b = torch.arange(z_in.shape[0], device=z_in.device)
    fused = c[ci, b] * s[si, b] + mu[si, b]
    return fused, si, ci


def resolve_ldm(name: str, backbone) -> str:
    """``auto``: the demo LDM for the demo CLIP, Stable Diffusion v1.5 otherwise."""
    if name != "auto":
        return name
    return "demo" if backbone.model_name.startswith("demo") else SD_DEFAULT


def clip_train_transform(preprocess):
    """DomainBed's augment_transform at a CLIP's input size, with the CLIP's normalisation."""
    from torchvision import transforms as T

    steps = list(preprocess.transforms)
    size = next(t.size for t in steps if isinstance(t, T.CenterCrop))
    return augment_transform(
        size[0] if isinstance(size, (tuple, list)) else size, next(t for t in steps if isinstance(t, T.Normalize))
    )


# --------------------------------------------------------------------- the method
class DomainFusion(ERM):
    Config = DomainFusionConfig
    extras = ("domainfusion",)  # diffusers (and transformers for Stable Diffusion's text encoder)
    generates = True  # promptdg generate writes its augmented sets
    loss_terms = ("ce", "ld", "ld_grad_rms")  # CE, latent distillation, and the size of its latent gradient (logged)
    backbone_kinds = ("classifier", "clip")

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        self._ldm = None
        self.counts = {"generated_images": 0, "synthetic_images": 0}
        self.round = 0

    def build_network(self):
        """The classifier backbone's featurizer and a linear head (the paper's), or a CLIP image
        encoder (BatchNorm frozen) with a head initialised as zero-shot CLIP."""
        self.clip = getattr(self.backbone, "kind", "clip") == "clip"
        if not self.clip:
            if not self.cfg.train_encoder:
                raise ConfigError(
                    "method.train_encoder=false keeps a CLIP image encoder frozen (cached features); "
                    f"backbone={self.backbone.model_name} is a classifier, trained end to end: use train_encoder=true"
                )
            return super().build_network()
        visual = self.backbone.model.visual
        self.frozen = not self.cfg.train_encoder
        feat = Featurizer(visual if self.frozen else copy.deepcopy(visual), self.backbone.embed_dim)
        feat.requires_grad_(not self.frozen)
        feat.train(not self.frozen)
        text = self.backbone.zeroshot_weights(self.classnames, [self.cfg.zeroshot_template])  # (C, D)
        head = nn.Linear(text.shape[1], text.shape[0]).to(self.device)
        with torch.no_grad():
            head.weight.copy_(text)
            head.bias.zero_()
        self.scale = float(self.backbone.logit_scale)  # CLIP's temperature, fixed
        return feat, head

    def head(self, f):
        return self.scale * self.classifier(F.normalize(f, dim=-1)) if self.clip else self.classifier(f)

    def train_transform(self):
        if not self.clip or not self.cfg.augment:
            return super().train_transform()
        return clip_train_transform(self.backbone.preprocess)

    @torch.no_grad()
    def encode_files(self, paths: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Normalised features of image files by the frozen encoder, (N, D) on the CPU."""
        out = []
        for _, x, bad in image_batches(
            paths, self.backbone.preprocess, batch_size, self.env.num_workers, device=self.device
        ):
            if bad:
                raise OSError(f"cannot read {paths[bad[0]]}")
            with devices.autocast(self.device, self.env.precision):  # backbone.precision, as the feature cache
                out.append(F.normalize(self.featurizer(x.to(self.device, non_blocking=True)).float(), dim=-1).cpu())
        return torch.cat(out)

    def extra_results(self):
        return dict(self.counts)

    # ----------------------------------------------------------------- the LDM
    def ldm(self):
        if self._ldm is None:
            source = resolve_ldm(self.cfg.ldm, self.backbone)
            if source == "demo":  # built once on first use, conditioned on the demo CLIP's text tower
                if not self.backbone.model_name.startswith("demo"):
                    raise ConfigError(
                        "method.ldm=demo is conditioned on the demo CLIP's text tower: use it with backbone=demo_clip"
                    )
                # built once by jobs that start at once
                source = str(plugins.load("ldm", "demo", "method.ldm")(self.env.cache_root, self.backbone))
            self._ldm = load_ldm(
                source,
                self.device,
                self.cfg.ldm_dtype,
                self.cfg.ldm_revision,
                clip=self.backbone if self.clip else None,
            )
        return self._ldm

    def generator_name(self) -> str:
        """The LDM that generates (``promptdg generate`` records it)."""
        return resolve_ldm(self.cfg.ldm, self.backbone)

    def ldm_size(self) -> int:
        return int(self.cfg.ldm_resolution or self.ldm().resolution)

    def vae_factor(self) -> int:
        return 2 ** (len(self.ldm().vae.config.block_out_channels) - 1)

    def prompts(self, y: torch.Tensor) -> List[str]:
        return [self.cfg.prompt.format(self.classnames[int(c)]) for c in y]

    # ----------------------------------------------------------------- online lightweight augmentation
    @torch.no_grad()
    def augment(
        self, x01: torch.Tensor, y: torch.Tensor, generator: torch.Generator, what: str = "augmentation"
    ) -> torch.Tensor:
        """N img2img candidates per image, fused by style/content; returns new images in [0, 1] (NaN or
        inf at a step: NonFiniteError naming ``what`` and the step, never a black image)."""
        ldm, cfg = self.ldm(), self.cfg
        x = to_ldm_pixels(x01.to(ldm.device))
        z_in = check_finite(ldm.encode(x), f"{what}: the VAE latents of the inputs", ldm.dtype)
        prompts = self.prompts(y)
        cands = torch.stack([ldm.img2img(x, prompts, cfg.strength, cfg.img2img_steps, cfg.img2img_guidance, generator)
                             for _ in range(cfg.candidates)])  # (N, B, c, h, w)
        check_finite(cands.transpose(0, 1), f"{what}: the img2img candidates' latents", ldm.dtype)
        fused, _, _ = fuse_candidates(z_in, cands)
        return check_finite((ldm.decode(fused) + 1) / 2, f"{what}: the decoded fused images", ldm.dtype)

    def augment_images(self, paths: List[str], labels: List[int], generator: torch.Generator) -> torch.Tensor:
        """Image files augmented (their [0, 1] pixels at the LDM's size, (B, 3, R, R)); NaN or inf at a step names
        the batch by its first file."""
        what = f"augmenting {paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        return self.augment(ldm_pixels(paths, self.ldm_size()), torch.as_tensor(labels), generator, what)

    def write_round(self, inputs: Sequence[str], labels: Sequence[int], outputs: Sequence[Path], seed: int, desc: str,
                    produce) -> list:
        """``inputs`` augmented into the PNG files ``outputs`` (``synthetic.write_round``: resumable,
        batch by batch through ``produce``); returns its recovery events."""
        return write_round(self.augment_images, inputs, labels, outputs, seed, self.cfg.generate_batch, desc, produce,
                           device=self.ldm().device)

    def on_epoch(self, epoch, ctx):
        """Every T epochs the synthetic set is replaced by its augmented copy (a round resumes from its files)."""
        cfg = self.cfg
        if epoch == 0 or epoch % cfg.augment_every or self.round >= epoch // cfg.augment_every:
            return
        r = epoch // cfg.augment_every
        outs = round_outputs(self.syn_dir, r, len(self.syn_src))
        ctx.recovered += self.write_round(
            self.syn_paths, self.syn_labels, outs, round_seed(self.env.seed, r), f"augmentation round {r}", ctx.files
        )
        self.round = r  # counted once per round, however often an interrupted round was resumed or shared out
        n = len(self.syn_src)
        self.counts = {"generated_images": self.counts["generated_images"] + cfg.candidates * n,
                       "synthetic_images": self.counts["synthetic_images"] + n}
        self._use_round(r)

    def _use_round(self, r: int) -> None:
        self.syn_paths = (
            [str(o) for o in round_outputs(self.syn_dir, r, len(self.syn_src))] if r else list(self.src_paths)
        )
        self.feats = None  # (a frozen encoder re-encodes the new synthetic set once)

    def extra_state(self):
        return {"round": self.round, "counts": dict(self.counts)}

    def load_extra_state(self, state):
        if state:
            self.round, self.counts = int(state["round"]), dict(state["counts"])
            self._use_round(self.round)

    # ----------------------------------------------------------------- training
    def fit(self, data, ctx):
        self.setup(data, ctx)
        cfg, train = self.cfg, data.train
        n = len(train)
        rng = self.env.numpy_rng("domainfusion-synthetic-set")
        self.syn_src = np.sort(rng.choice(n, size=max(1, int(round(cfg.synthetic_fraction * n))), replace=False))
        self.syn_labels = [int(train.y[i]) for i in self.syn_src]
        self.src_paths = [train.paths[i] for i in self.syn_src]  # round 0: copies of the source images
        self.syn_dir = ctx.split_dir / "synthetic"
        self.n_source = n
        self._use_round(0)
        self.lo, self.hi = (int(f * (self.ldm().num_train_timesteps - 1)) for f in cfg.t_range)
        self.labels = torch.cat([train.y, torch.as_tensor(self.syn_labels, dtype=torch.long)]).to(self.device)
        ctx.log(
            synthetic_set=len(self.syn_src),
            ldm=resolve_ldm(cfg.ldm, self.backbone),
            ldm_resolution=self.ldm_size(),
            t_min=self.lo,
            t_max=self.hi,
        )
        ctx.train(self)

    def draw(self, g):
        """The source domains' minibatches, then ``batch_size`` draws of the synthetic set (indices after
        the sources')."""
        real = super().draw(g)
        return torch.cat(
            [real, self.n_source + torch.randint(len(self.syn_src), (int(self.hp["batch_size"]),), generator=g)]
        )

    def epoch_batches(self, epoch, g):
        """ERM's steps with a third tensor: which draws are distilled (``distill_per_step`` source draws,
        evenly spaced)."""
        out = []
        for idx, draw_seeds in super().epoch_batches(epoch, g):
            n_src, k = (
                int(self.hp["batch_size"]) * len(self.rows),
                min(int(self.cfg.distill_per_step), int(self.hp["batch_size"]) * len(self.rows)),
            )
            mask = torch.zeros(len(idx), dtype=torch.bool)
            mask[[(j * n_src) // k for j in range(k)] if self.cfg.distill_weight else []] = True
            out.append((idx, draw_seeds, mask))
        return out

    def load(self, epoch, batches):
        if self.frozen and self.feats is None:  # a frozen encoder sees each image once per round
            self.feats = torch.cat([self.train.x, self.encode_files(self.syn_paths)])
        self.paths = list(self.train.paths) + self.syn_paths
        return super().load(epoch, batches)

    def batch_loss(self, item, info):
        cfg = self.cfg
        (_, draw_seeds, mask), (idx, x, x01) = item
        y = self.labels[idx.to(self.device)]
        logits = self.forward(x, idx)
        terms = [Term("ce", F.cross_entropy(logits, y), len(idx))]
        rows = torch.nonzero(mask).flatten()
        if not len(rows):
            return terms
        ldm, lat = self.ldm(), self.ldm_size() // self.vae_factor()
        t, noise = [], []
        for s in draw_seeds[rows].tolist():  # each distilled draw's t and ε from its own seed
            g = seeds.generator("domainfusion-distilled-draw", s)
            t.append(torch.randint(self.lo, self.hi + 1, (1,), generator=g))
            noise.append(torch.randn((ldm.unet.config.in_channels, lat, lat), generator=g))
        rows_d = rows.to(self.device)
        p = logits[rows_d].softmax(-1).gather(1, y[rows_d, None]).squeeze(1)  # p_θ(y|x)
        loss_ld, grad = latent_distillation_loss(
            ldm,
            p.to(ldm.device),
            x01.to(ldm.device),
            ldm.encode_text(self.prompts(y[rows_d])),
            torch.cat(t).to(ldm.device),
            torch.stack(noise).to(ldm.device),
            cfg.distill_guidance,
            cfg.weighting,
            where=f"latent distillation, period {info.epoch} step {info.step}",
        )
        # the surrogate's value means nothing: the size of w(t)(ε̂ − ε) is logged
        rms = grad.pow(2).mean().sqrt().detach()
        return terms + [
            Term("ld", loss_ld.to(self.device), len(rows), cfg.distill_weight),
            Term("ld_grad_rms", rms, len(rows), 0.0),
        ]
