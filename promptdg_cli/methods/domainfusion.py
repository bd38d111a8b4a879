"""DomainFusion (Huang et al., "DomainFusion: Generalizing To Unseen Domains with Latent Diffusion
Models", ECCV 2024). There is no public code; this follows the paper's description, and every
choice the paper leaves open is listed below with its default and the reason.

A DG classifier (the backbone's image encoder and a linear head initialised from the zero-shot
text embeddings) is trained with cross-entropy on the labelled source images plus a synthetic set,
and one frozen latent diffusion model (LDM) helps in two ways:

1. **Latent distillation.** Each source image is darkened by the classifier's confidence in its
   label, x(θ) = p_θ(y|x) · x, encoded by the VAE, z(θ) = E(x(θ)), and noised at a random timestep,
   z_t = sqrt(ᾱ_t) z + sqrt(1 − ᾱ_t) ε. The frozen UNet, prompted with "a photo of a [class]",
   predicts ε̂. The loss is the score-distillation surrogate

       L_LD = mean_b Σ_j sg[w(t) (ε̂ − ε)]_bj · z(θ)_bj,     ∂L_LD/∂z = w(t)(ε̂ − ε) / B,

   so the gradient reaches θ through z(θ) → x(θ) → p_θ and never through the UNet (ε̂ is computed
   under ``no_grad`` and detached; no LDM weight requires a gradient).

2. **Online lightweight augmentation.** Every T epochs each image of the current synthetic set
   (at first: copies of the source training images) yields N img2img candidates from the LDM. Each
   candidate latent is split into a style (channel-wise mean and std) and a content (the latent
   normalised by them); the style farthest from the input's and the content closest to the input's
   are fused, AdaIN-style, into the image that replaces the input: content* · σ_style + μ_style.

    L = CE(source ∪ synthetic batch) + λ · L_LD

Choices the paper leaves open (config key, default, why):

* ``ldm`` auto: the demo LDM with the demo CLIP, else Stable Diffusion v1.5
  (``stable-diffusion-v1-5/stable-diffusion-v1-5``): the most used SD 1.x checkpoint; the paper
  uses an off-the-shelf SD without fine-tuning. Any SD 1.x/2.x folder or hub id works.
* ``ldm_resolution`` null: the LDM's own size, at most 256 px. Stable Diffusion then works at 256 px
  (latents 32×32), a quarter of its native 512² cost; DG images are 224 px, so 512 would only
  upsample them. The demo LDM works at its 32 px.
* ``style_space`` latent: style and content are computed on the VAE latents of the candidates, so a
  candidate is never decoded; only the fused image is (one VAE decode per kept image).
* Style distance: L2 between the concatenated (μ, σ) vectors; content distance: L2 between the
  normalised latents.
* ``prompt`` "a photo of a {}" for both distillation and img2img, as the paper's class prompt.
* ``distill_weight`` λ = 1, ``t_range`` [0.02, 0.98] of the training timesteps and w(t) = 1 − ᾱ_t
  (DreamFusion's score-distillation defaults), ``distill_guidance`` 7.5 (SD's usual CFG scale; real
  images need far less than DreamFusion's 100), on up to ``distill_per_step`` 8 source images of each
  batch (the VAE backward pass is the expensive part).
* x(θ) darkens pixels in [0, 1] (black is 0), then maps them to the LDM's [-1, 1].
* The latent of x(θ) is the VAE posterior mean (deterministic; the sample's noise adds nothing the
  diffusion noise does not).
* ``augment_every`` T = 5 epochs, ``candidates`` N = 4, ``strength`` 0.5 with 20 DDIM steps (10 run),
  ``img2img_guidance`` 7.5; ``synthetic_fraction`` 1.0 (every source training image has a synthetic
  copy; lower it on DomainNet, see conf/experiment/domainfusion_main.yaml). Rounds happen at the
  start of epochs T, 2T, ...; a round's inputs are the current synthetic images, so variation
  accumulates over rounds.
* Classifier: Adam, lr 5e-5, no weight decay, batch 32 (DomainBed's ERM defaults, which the paper's
  DomainBed protocol uses), ``epochs`` 20 over source ∪ synthetic, model selection on source
  validation (``select`` val). ``train_encoder`` true fine-tunes the image encoder as the paper's DG
  model is trained end to end (its BatchNorm statistics stay frozen, as DomainBed's ResNets);
  false trains the head only, on the frozen encoder.
* The generated-image count (``generated_images`` in results.json) counts LDM img2img candidates,
  the figure that compares to offline augmentation; ``synthetic_images`` counts fused images.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import ConfigError
from ..recovery import image_error, recovery_event
from ..schema import MethodConfig
from .base import Method
from .zeroshot import zeroshot_weights

SD_DEFAULT = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class DomainFusionConfig(MethodConfig):
    name: str = "domainfusion"
    # the latent diffusion model
    ldm: str = "auto"  # auto | demo | a local SD folder | a hub id in the local HF cache
    ldm_revision: Optional[str] = None
    ldm_dtype: str = "auto"  # auto: fp16 on a GPU, fp32 on the CPU | fp32 | fp16 | bf16
    ldm_resolution: Optional[int] = None  # None: the LDM's sample size, at most 256 (SD 1.x: 256, the demo LDM: 32)
    prompt: str = "a photo of a {}"
    # the DG classifier
    train_encoder: bool = True
    zeroshot_template: str = "a photo of a {}."
    epochs: int = 20
    batch_size: int = 32
    lr: float = 5.0e-5
    weight_decay: float = 0.0
    select: str = "val"  # val | last
    # latent distillation
    distill_weight: float = 1.0
    t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])
    weighting: str = "1-alpha"  # w(t): 1-alpha (1 − ᾱ_t) | constant
    distill_guidance: float = 7.5
    distill_per_step: int = 8
    # online lightweight augmentation
    augment_every: int = 5
    candidates: int = 4
    strength: float = 0.5
    img2img_steps: int = 20
    img2img_guidance: float = 7.5
    synthetic_fraction: float = 1.0
    generate_batch: int = 16
    generate_rounds: int = 1  # promptdg generate: fused images per source image (each from the previous)


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


def latent_distillation_loss(ldm, p: torch.Tensor, x01: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                             noise: torch.Tensor, guidance: float, weighting: str = "1-alpha"):
    """L_LD of a batch and its latent gradient g = w(t)(ε̂ − ε).

    p: (B,) the classifier's probability of each image's label (differentiable); x01: (B, 3, R, R)
    pixels in [0, 1]; cond: (B, L, D) the class prompts' text states; t: (B,) timesteps; noise: the
    ε of the forward process, shaped like the latents. Returns (loss, g) with ∂loss/∂z = g / B.
    """
    from ..ldm import to_ldm_pixels

    z = ldm.encode(to_ldm_pixels(darken(x01, p)))  # (B, c, h, w): gradient flows to p
    with torch.no_grad():
        z_t = ldm.add_noise(z.detach(), noise, t)
        eps_hat = ldm.predict_noise(z_t, t, cond, guidance)
        w = distill_weighting(ldm.alphas_cumprod(), t, weighting).view(-1, 1, 1, 1)
        g = w * (eps_hat - noise)
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


# --------------------------------------------------------------------- images on disk
class _Images(torch.utils.data.Dataset):
    """Each image as (index, classifier input, LDM input in [0, 1] at the LDM's resolution)."""

    def __init__(self, paths: Sequence[str], clf_transform, ldm_size: Optional[int]):
        from torchvision import transforms as T

        self.paths, self.clf = list(paths), clf_transform
        self.ldm = None if ldm_size is None else T.Compose([T.Resize(ldm_size, interpolation=T.InterpolationMode.BICUBIC),
                                                             T.CenterCrop(ldm_size), T.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB")
            clf = self.clf(im) if self.clf is not None else torch.zeros(0)
            return i, clf, self.ldm(im) if self.ldm is not None else torch.zeros(0)


def _loader(paths, clf_transform, ldm_size, batch_size, num_workers, batches):
    """The images of ``batches`` (lists of indices into ``paths``), batch by batch."""
    ds = _Images(paths, clf_transform, ldm_size)
    return torch.utils.data.DataLoader(ds, batch_sampler=batches,
                                       num_workers=num_workers if sum(map(len, batches)) > 4 * batch_size else 0)


def save_png(x01: torch.Tensor, path: Path) -> None:
    """One image (3, H, W) in [0, 1] as an 8-bit PNG, written atomically."""
    arr = (x01.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------- the method
class DomainFusion(Method):
    Config = DomainFusionConfig
    cache_root: Optional[str] = None  # where the demo LDM is cached (set by the engine)

    def __init__(self, cfg, backbone, classnames, device):
        super().__init__(cfg, backbone, classnames, device)
        visual = backbone.model.visual
        self.encoder = copy.deepcopy(visual) if cfg.train_encoder else visual
        self.encoder.requires_grad_(bool(cfg.train_encoder))
        self.encoder.eval()  # BatchNorm statistics stay those of the pretrained encoder
        text = zeroshot_weights(backbone, classnames, [cfg.zeroshot_template])  # (C, D)
        self.head = nn.Linear(text.shape[1], text.shape[0]).to(device)
        with torch.no_grad():
            self.head.weight.copy_(text)
            self.head.bias.zero_()
        self.scale = float(backbone.logit_scale)  # CLIP's temperature, fixed
        self._ldm = None
        self.counts = {"generated_images": 0, "synthetic_images": 0}

    # ----------------------------------------------------------------- classifier
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(images.to(self.device)), dim=-1)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(feats)

    @torch.no_grad()
    def logits(self, x):
        return self.classify(x.to(self.device))

    def features_for(self, feats, batch_size: int = 128):
        """A fine-tuned encoder re-encodes the test images (cached features are the pretrained encoder's)."""
        if not self.cfg.train_encoder:
            return feats
        from ..data import Features

        return Features(self.encode_files(feats.paths, batch_size), feats.y, feats.domain, feats.paths)

    def state_dict(self):
        state = {"head.weight": self.head.weight.detach(), "head.bias": self.head.bias.detach()}
        if self.cfg.train_encoder:
            state |= {f"encoder.{k}": v.detach() for k, v in self.encoder.state_dict().items()}
        return state

    def load_state_dict(self, state):
        self.head.weight.data.copy_(state["head.weight"].to(self.device))
        self.head.bias.data.copy_(state["head.bias"].to(self.device))
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if enc:
            self.encoder.load_state_dict(enc)

    def extra_results(self):
        return dict(self.counts)

    # ----------------------------------------------------------------- the LDM
    def ldm(self):
        if self._ldm is None:
            from ..ldm import load_ldm

            self._ldm = load_ldm(resolve_ldm(self.cfg.ldm, self.backbone), self.device, self.cfg.ldm_dtype,
                                 self.cfg.ldm_revision, clip=self.backbone, cache_root=self.cache_root)
        return self._ldm

    def ldm_size(self) -> int:
        return int(self.cfg.ldm_resolution or min(self.ldm().resolution, 256))

    def prompts(self, y: torch.Tensor) -> List[str]:
        return [self.cfg.prompt.format(self.classnames[int(c)]) for c in y]

    # ----------------------------------------------------------------- online lightweight augmentation
    @torch.no_grad()
    def augment(self, x01: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """N img2img candidates per image, fused by style/content; returns new images in [0, 1]."""
        from ..ldm import to_ldm_pixels

        ldm, cfg = self.ldm(), self.cfg
        x = to_ldm_pixels(x01.to(ldm.device))
        z_in = ldm.encode(x)
        prompts = self.prompts(y)
        cands = torch.stack([ldm.img2img(x, prompts, cfg.strength, cfg.img2img_steps, cfg.img2img_guidance, generator)
                             for _ in range(cfg.candidates)])  # (N, B, c, h, w)
        fused, _, _ = fuse_candidates(z_in, cands)
        return (ldm.decode(fused) + 1) / 2

    def augment_files(self, inputs: Sequence[str], labels: Sequence[int], outputs: Sequence[Path], seed: int, desc: str,
                      progress=None, ctx=None) -> list:
        """Augment ``inputs`` into ``outputs`` (PNG), skipping outputs that exist and decode (an
        interrupted round resumes; a file that does not decode is generated again and returned as a
        recovery event); each batch has its own seeded generator, so a resumed round is identical.
        Under torchrun rank r generates batches r, r + world, ... (every file has one writer); a
        preemption signal stops the round after the batch in progress (its files are kept)."""
        bs = self.cfg.generate_batch
        rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
        todo = [i for n, i in enumerate(range(0, len(inputs), bs)) if n % world == rank]
        broken = {o: err for i in todo for o in outputs[i : i + bs] if Path(o).is_file() and (err := image_error(Path(o)))}
        events = [recovery_event(o, err, "generated again") for o, err in broken.items()]
        todo = [i for i in todo if not all(Path(o).is_file() and o not in broken for o in outputs[i : i + bs])]
        bar = progress(todo, desc=desc) if progress else todo
        for start in bar:
            if ctx is not None and world == 1:
                ctx.preempt_point()  # the last epoch checkpoint stands; the round resumes from its files
            idx = list(range(start, min(start + bs, len(inputs))))
            ds = _Images([inputs[i] for i in idx], None, self.ldm_size())
            x01 = torch.stack([ds[j][2] for j in range(len(idx))])
            y = torch.as_tensor([labels[i] for i in idx])
            g = torch.Generator(device=self.ldm().device).manual_seed(seed * 1_000_003 + start)
            out = self.augment(x01, y, g)
            for j, i in enumerate(idx):
                save_png(out[j], Path(outputs[i]))
        if ctx is not None and world > 1:
            ctx.barrier()  # every rank reads the whole round next
            ctx.preempt_point()
        return events

    # ----------------------------------------------------------------- training
    def fit(self, data, ctx):
        from ..engine import resume_point

        cfg = self.cfg
        if cfg.select not in ("val", "last"):
            raise ConfigError(f"method.select={cfg.select!r}. Valid: val, last")
        train = data["train"]
        n = len(train)
        rng = np.random.default_rng([ctx.seed, 7])
        syn_src = np.sort(rng.choice(n, size=max(1, int(round(cfg.synthetic_fraction * n))), replace=False))
        syn_labels = [int(train.y[i]) for i in syn_src]
        syn_paths = [train.paths[i] for i in syn_src]  # round 0: copies of the source images
        params = list(self.head.parameters()) + (list(self.encoder.parameters()) if cfg.train_encoder else [])
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        best = {"acc": -1.0, "epoch": -1, "state": None}
        rnd, sums0 = 0, np.zeros(3)
        state = ctx.load_checkpoint()
        start, done = resume_point(state)
        if state is not None:
            self.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            best, rnd, self.counts = state["best"], state["round"], state["counts"]
            sums0 = np.asarray(state.get("sums", sums0))
        ctx.broadcast_params(params)
        syn_dir = ctx.split_dir / "synthetic"
        if rnd:
            syn_paths = [str(syn_dir / f"round{rnd}" / f"{k:06d}.png") for k in range(len(syn_src))]
        # a frozen encoder sees each image once: source features come from the feature cache, the
        # synthetic set's are computed once per round; only the distilled images' pixels are read
        frozen = not cfg.train_encoder
        clf_tf = None if frozen else self.backbone.preprocess
        size = self.ldm_size()
        lo, hi = (int(f * (self.ldm().num_train_timesteps - 1)) for f in cfg.t_range)
        ctx.log(synthetic_set=len(syn_src), ldm=resolve_ldm(cfg.ldm, self.backbone), ldm_resolution=size, t_min=lo, t_max=hi)
        feats_all = torch.cat([train.x, self.encode_files(syn_paths)]) if frozen else None
        bs = cfg.batch_size
        for epoch in ctx.progress(range(start, cfg.epochs), desc="domainfusion epochs", initial=start, total=cfg.epochs):
            if epoch > 0 and epoch % cfg.augment_every == 0 and rnd < epoch // cfg.augment_every:
                r = epoch // cfg.augment_every  # online augmentation: the synthetic set is replaced
                outs = [syn_dir / f"round{r}" / f"{k:06d}.png" for k in range(len(syn_src))]
                ctx.recovered += self.augment_files(syn_paths, syn_labels, outs, seed=ctx.seed * 1009 + r,
                                                    desc=f"augmentation round {r}", progress=ctx.progress, ctx=ctx)
                # counted once per round, however often an interrupted round was resumed or shared out
                rnd = r
                self.counts = {"generated_images": self.counts["generated_images"] + cfg.candidates * len(syn_src),
                               "synthetic_images": self.counts["synthetic_images"] + len(syn_src)}
                syn_paths = [str(o) for o in outs]
                if frozen:
                    feats_all = torch.cat([train.x, self.encode_files(syn_paths)])
            paths = list(train.paths) + syn_paths
            labels = torch.cat([train.y, torch.as_tensor(syn_labels, dtype=torch.long)]).to(self.device)
            is_source = np.arange(len(paths)) < n
            order = np.random.default_rng([ctx.seed, epoch]).permutation(len(paths))
            first = done if epoch == start else 0
            sums = sums0.copy() if epoch == start else np.zeros(3)
            steps = [(k, order[i : i + bs]) for k, i in enumerate(range(0, len(order), bs))][first:]
            local = [np.asarray(ctx.shard(batch)) for _, batch in steps]  # this rank's part of each global batch
            loader = iter(_loader(paths, clf_tf, size, bs, self.num_workers, batches=[b.tolist() for b in local if len(b)]))
            for (k, batch), mine in zip(steps, local):
                ce, loss_ld, g_rms = torch.zeros((), device=self.device), torch.zeros((), device=self.device), 0.0
                # the distilled images: the first distill_per_step source images of the global batch
                src_global = [int(i) for i in batch if is_source[i]][: cfg.distill_per_step]
                if len(mine):
                    pos, x_clf, x01 = next(loader)
                    y = labels[pos.to(self.device)]
                    f = feats_all[pos].to(self.device) if frozen else self.image_features(x_clf)
                    logits = self.classify(f)
                    ce = ctx.batch_share(F.cross_entropy(logits, y), len(mine), len(batch))
                    where = {int(i): j for j, i in enumerate(pos.tolist())}
                    src = [s_ for s_ in src_global if s_ in where]
                    if cfg.distill_weight and src:
                        ldm = self.ldm()
                        # t and ε are drawn for the global list and indexed: the same as on one process
                        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + epoch * 10_007 + k)
                        t_all = torch.randint(lo, hi + 1, (len(src_global),), generator=g)
                        z_shape = (len(src_global), ldm.unet.config.in_channels, size // self.vae_factor(), size // self.vae_factor())
                        noise_all = torch.randn(z_shape, generator=g)
                        sel = torch.as_tensor([src_global.index(s_) for s_ in src])
                        rows = torch.as_tensor([where[s_] for s_ in src], device=self.device)
                        p = logits[rows].softmax(-1).gather(1, y[rows, None]).squeeze(1)  # p_θ(y|x)
                        cond = ldm.encode_text(self.prompts(y[rows]))
                        loss_ld, grad = latent_distillation_loss(ldm, p.to(ldm.device), x01[rows.cpu()].to(ldm.device), cond,
                                                                 t_all[sel].to(ldm.device), noise_all[sel].to(ldm.device),
                                                                 cfg.distill_guidance, cfg.weighting)
                        loss_ld = ctx.batch_share(loss_ld.to(self.device), len(src), len(src_global))
                        g_rms = grad.pow(2).mean().sqrt().item() * len(src)
                loss = ce + cfg.distill_weight * loss_ld
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                ctx.sync_grads(params)
                opt.step()
                # logged: the global batch means (summed shares); the surrogate's value means nothing
                # (only its gradient does), so the size of w(t)(ε̂ − ε) is logged instead
                sums += ctx.all_sum(np.array([loss.item(), ce.item(), g_rms / max(len(src_global), 1)]))
                ctx.preempt_point(lambda: {"epoch": epoch, "step": k + 1, "round": rnd, "model": self.state_dict(),
                                           "optimizer": opt.state_dict(), "best": best, "counts": self.counts, "sums": sums.tolist()})
            n_steps = -(-len(order) // bs)
            val_acc = ctx.accuracy(self, data["val"]) if len(data.get("val") or ()) else 0.0
            if cfg.select == "last" or val_acc > best["acc"]:
                best = {"acc": val_acc, "epoch": epoch, "state": {k_: v.clone() for k_, v in self.state_dict().items()}}
            ctx.log(epoch=epoch, round=rnd, val_acc=val_acc, **dict(zip(("loss", "ce", "ld_grad_rms"), (sums / n_steps).tolist())))
            ctx.save_checkpoint({"epoch": epoch, "round": rnd, "model": self.state_dict(), "optimizer": opt.state_dict(),
                                 "best": best, "counts": self.counts})
        if best["state"] is not None:
            self.load_state_dict(best["state"])
        ctx.log(selected_epoch=best["epoch"], selected_val_acc=best["acc"], **self.counts)

    @torch.no_grad()
    def encode_files(self, paths: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Normalised features of image files by the (frozen) encoder, (N, D) on the CPU."""
        from ..data import image_batches

        out = []
        for _, x, bad in image_batches(paths, self.backbone.preprocess, batch_size, self.num_workers):
            if bad:
                raise OSError(f"cannot read {paths[bad[0]]}")
            out.append(self.image_features(x).cpu())
        return torch.cat(out)

    def vae_factor(self) -> int:
        return 2 ** (len(self.ldm().vae.config.block_out_channels) - 1)

    # ----------------------------------------------------------------- promptdg generate
    @classmethod
    def generate(cls, cfg, run_dir: Path) -> dict:
        """Write an augmented copy of the source domains in DomainBed's layout (see ``write_augmented``)."""
        return write_augmented(cls, cfg, Path(run_dir))


def resolve_ldm(name: str, backbone) -> str:
    """``auto``: the demo LDM for the demo CLIP, Stable Diffusion v1.5 for a real CLIP."""
    if name != "auto":
        return name
    return "demo" if backbone.model_name.startswith("demo") else SD_DEFAULT


def write_augmented(cls, cfg, run_dir: Path) -> dict:
    """``promptdg generate``: every image of the source domains (all domains but ``target``) through
    ``generate_rounds`` rounds of online lightweight augmentation, written as
    ``<run_dir>/images/<dataset folder>/<domain>/<class>/<image>.png``. The held-out domain is linked
    from the real dataset, so the folder is a dataset for the same leave-one-domain-out split
    (``data_root=<run_dir>/images``). Resumable image by image; a finished set is never rewritten."""
    from ..backbone import ClipBackbone
    from ..data import _check_domains, class_names, dataset_dir, list_domain
    from ..engine import select_device, write_json_atomic

    done = run_dir / "generated.json"
    if done.is_file():
        info = json.loads(done.read_text())
        print(f"[promptdg] {run_dir}/images is finished ({info['images']} images); not rewriting it. Remove the folder to generate again.")
        return info
    sources = _check_domains(cfg.dataset, cfg.target, cfg.source)
    if cfg.target:
        sources = [d for d in sources if d != cfg.target]
    root = dataset_dir(cfg.dataset)
    device = select_device(cfg.device)
    backbone = ClipBackbone.from_config(cfg.backbone, device=device)
    method = cls(cfg.method, backbone, class_names(cfg.dataset), device)
    method.cache_root, method.num_workers = cfg.cache_root, cfg.num_workers
    out_root = run_dir / "images" / cfg.dataset.folder
    total, recovered = 0, []  # recovered: broken images of an interrupted set, generated again
    from tqdm.auto import tqdm

    folders = list(cfg.dataset.classes.keys())
    for domain in sources:
        paths, labels = list_domain(cfg.dataset, domain)
        current = [str(p) for p in paths]
        for r in range(1, cfg.method.generate_rounds + 1):
            last = r == cfg.method.generate_rounds
            outs = [
                (out_root / domain / folders[c] / f"{Path(p).stem}.png") if last else (run_dir / "rounds" / f"round{r}" / domain / f"{k:06d}.png")
                for k, (p, c) in enumerate(zip(paths, labels))
            ]
            recovered += method.augment_files(current, labels, outs, seed=cfg.seed * 1009 + r, desc=f"generate {domain} round {r}",
                                              progress=lambda it, desc: tqdm(it, desc=desc, unit="batch", dynamic_ncols=True))
            current = [str(o) for o in outs]
        total += len(paths)
    if cfg.target:
        link = out_root / cfg.target
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((root / cfg.target).resolve(), link, target_is_directory=True)
    info = {"images": total, "sources": sources, "target": cfg.target, "rounds": cfg.method.generate_rounds,
            "generated_images": total * cfg.method.candidates * cfg.method.generate_rounds,
            "ldm": resolve_ldm(cfg.method.ldm, backbone), "dataset_root": str(run_dir / "images"), "recovered": recovered}
    write_json_atomic(done, info)
    print(f"[promptdg] wrote {total} augmented images of {', '.join(sources)} to {out_root} "
          f"({info['generated_images']} img2img candidates). Use it as a dataset: data_root={run_dir / 'images'} dataset={cfg.dataset.name}")
    return info
