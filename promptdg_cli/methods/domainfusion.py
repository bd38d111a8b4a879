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
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data import Features, image_batches
from ..demo.ldm import ensure_demo_ldm
from ..errors import ConfigError
from ..evaluation import accuracy
from ..ldm import load_ldm, to_ldm_pixels
from ..recovery import image_error, recovery_event
from ..schema import DomainFusionConfig
from ..training import Term, make_files
from .base import Method

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


def latent_distillation_loss(ldm, p: torch.Tensor, x01: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                             noise: torch.Tensor, guidance: float, weighting: str = "1-alpha"):
    """L_LD of a batch and its latent gradient g = w(t)(ε̂ − ε).

    p: (B,) the classifier's probability of each image's label (differentiable); x01: (B, 3, R, R)
    pixels in [0, 1]; cond: (B, L, D) the class prompts' text states; t: (B,) timesteps; noise: the
    ε of the forward process, shaped like the latents. Returns (loss, g) with ∂loss/∂z = g / B.
    """
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


def save_png(x01: torch.Tensor, path: Path) -> None:
    """One image (3, H, W) in [0, 1] as an 8-bit PNG, written atomically."""
    arr = (x01.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def resolve_ldm(name: str, backbone) -> str:
    """``auto``: the demo LDM for the demo CLIP, Stable Diffusion v1.5 for a real CLIP."""
    if name != "auto":
        return name
    return "demo" if backbone.model_name.startswith("demo") else SD_DEFAULT


# --------------------------------------------------------------------- the method
class DomainFusion(Method):
    Config = DomainFusionConfig
    extras = ("domainfusion",)  # diffusers (and transformers for Stable Diffusion's text encoder)

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        visual = backbone.model.visual
        self.encoder = copy.deepcopy(visual) if cfg.train_encoder else visual
        self.encoder.requires_grad_(bool(cfg.train_encoder))
        self.encoder.eval()  # BatchNorm statistics stay those of the pretrained encoder
        text = backbone.zeroshot_weights(classnames, [cfg.zeroshot_template])  # (C, D)
        self.head = nn.Linear(text.shape[1], text.shape[0]).to(device)
        with torch.no_grad():
            self.head.weight.copy_(text)
            self.head.bias.zero_()
        self.scale = float(backbone.logit_scale)  # CLIP's temperature, fixed
        self._ldm = None
        self.counts = {"generated_images": 0, "synthetic_images": 0}
        self.round = 0

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
        return Features(self.encode_files(feats.paths, batch_size), feats.y, feats.domain, feats.paths)

    @torch.no_grad()
    def encode_files(self, paths: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Normalised features of image files by the encoder, (N, D) on the CPU."""
        out = []
        for _, x, bad in image_batches(paths, self.backbone.preprocess, batch_size, self.env.num_workers):
            if bad:
                raise OSError(f"cannot read {paths[bad[0]]}")
            out.append(self.image_features(x).cpu())
        return torch.cat(out)

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
            source = resolve_ldm(self.cfg.ldm, self.backbone)
            if source == "demo":  # built once on first use, conditioned on the demo CLIP's text tower
                if not self.backbone.model_name.startswith("demo"):
                    raise ConfigError("method.ldm=demo is conditioned on the demo CLIP's text tower: use it with backbone=demo_clip")
                source = str(ensure_demo_ldm(self.env.cache_root, self.backbone))  # built once by jobs that start at once
            self._ldm = load_ldm(source, self.device, self.cfg.ldm_dtype, self.cfg.ldm_revision, clip=self.backbone)
        return self._ldm

    def generator_name(self) -> str:
        """The LDM that generates (``promptdg generate`` records it)."""
        return resolve_ldm(self.cfg.ldm, self.backbone)

    def ldm_size(self) -> int:
        return int(self.cfg.ldm_resolution or min(self.ldm().resolution, 256))

    def vae_factor(self) -> int:
        return 2 ** (len(self.ldm().vae.config.block_out_channels) - 1)

    def prompts(self, y: torch.Tensor) -> List[str]:
        return [self.cfg.prompt.format(self.classnames[int(c)]) for c in y]

    # ----------------------------------------------------------------- online lightweight augmentation
    @torch.no_grad()
    def augment(self, x01: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """N img2img candidates per image, fused by style/content; returns new images in [0, 1]."""
        ldm, cfg = self.ldm(), self.cfg
        x = to_ldm_pixels(x01.to(ldm.device))
        z_in = ldm.encode(x)
        prompts = self.prompts(y)
        cands = torch.stack([ldm.img2img(x, prompts, cfg.strength, cfg.img2img_steps, cfg.img2img_guidance, generator)
                             for _ in range(cfg.candidates)])  # (N, B, c, h, w)
        fused, _, _ = fuse_candidates(z_in, cands)
        return (ldm.decode(fused) + 1) / 2

    def augment_batch(self, inputs: Sequence[str], labels: Sequence[int], outputs: Sequence[Path], idx: List[int], seed: int) -> None:
        """Images ``idx`` of ``inputs`` augmented into their ``outputs`` (PNG); the batch has its own
        generator, seeded by (seed, its first index), so a resumed round is identical."""
        ds = _Images([inputs[i] for i in idx], None, self.ldm_size())
        x01 = torch.stack([ds[j][2] for j in range(len(idx))])
        g = torch.Generator(device=self.ldm().device).manual_seed(seed * 1_000_003 + idx[0])
        out = self.augment(x01, torch.as_tensor([labels[i] for i in idx]), g)
        for j, i in enumerate(idx):
            save_png(out[j], Path(outputs[i]))

    def augment_files(self, inputs: Sequence[str], labels: Sequence[int], outputs: Sequence[Path], seed: int, desc: str,
                      ctx=None) -> list:
        """``inputs`` augmented into ``outputs`` batch by batch (``ctx.files``: resumable, shared out
        over ranks; one process without ``ctx``). An output of an interrupted run that does not decode
        (a half-written image) is generated again and returned as a recovery event."""
        broken = {Path(o): err for o in outputs if Path(o).is_file() and (err := image_error(Path(o)))}
        events = [recovery_event(o, err, "generated again") for o, err in broken.items()]
        (ctx.files if ctx is not None else make_files)(
            outputs, lambda idx: self.augment_batch(inputs, labels, outputs, idx, seed), self.cfg.generate_batch, desc,
            lambda o: o.is_file() and o not in broken)
        return events

    def on_epoch(self, epoch, ctx):
        """Every T epochs the synthetic set is replaced by its augmented copy (a round resumes from its files)."""
        cfg = self.cfg
        if epoch == 0 or epoch % cfg.augment_every or self.round >= epoch // cfg.augment_every:
            return
        r = epoch // cfg.augment_every
        outs = [self.syn_dir / f"round{r}" / f"{k:06d}.png" for k in range(len(self.syn_src))]
        ctx.recovered += self.augment_files(self.syn_paths, self.syn_labels, outs, self.env.seed * 1009 + r, f"augmentation round {r}", ctx)
        self.round = r  # counted once per round, however often an interrupted round was resumed or shared out
        n = len(self.syn_src)
        self.counts = {"generated_images": self.counts["generated_images"] + cfg.candidates * n,
                       "synthetic_images": self.counts["synthetic_images"] + n}
        self._use_round(r)

    def _use_round(self, r: int) -> None:
        self.syn_paths = [str(self.syn_dir / f"round{r}" / f"{k:06d}.png") for k in range(len(self.syn_src))] if r else list(self.src_paths)
        self.feats = None  # (a frozen encoder re-encodes the new synthetic set once)

    def extra_state(self):
        return {"round": self.round, "counts": dict(self.counts)}

    def load_extra_state(self, state):
        if state:
            self.round, self.counts = int(state["round"]), dict(state["counts"])
            self._use_round(self.round)

    # ----------------------------------------------------------------- training
    def fit(self, data, ctx):
        cfg, train = self.cfg, data.train
        self.train, self.val = train, data.val
        n = len(train)
        rng = np.random.default_rng([self.env.seed, 7])
        self.syn_src = np.sort(rng.choice(n, size=max(1, int(round(cfg.synthetic_fraction * n))), replace=False))
        self.syn_labels = [int(train.y[i]) for i in self.syn_src]
        self.src_paths = [train.paths[i] for i in self.syn_src]  # round 0: copies of the source images
        self.syn_dir = ctx.split_dir / "synthetic"
        self._use_round(0)
        # a frozen encoder sees each image once: source features come from the feature cache, the
        # synthetic set's are computed once per round; only the distilled images' pixels are read
        self.frozen = not cfg.train_encoder
        self.lo, self.hi = (int(f * (self.ldm().num_train_timesteps - 1)) for f in cfg.t_range)
        ctx.log(synthetic_set=len(self.syn_src), ldm=resolve_ldm(cfg.ldm, self.backbone), ldm_resolution=self.ldm_size(), t_min=self.lo, t_max=self.hi)
        ctx.train(self)

    def parameters_to_train(self):
        return list(self.head.parameters()) + (list(self.encoder.parameters()) if self.cfg.train_encoder else [])

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def epoch_batches(self, epoch, g):
        """Batches of indices into the source training images followed by the synthetic set."""
        self.paths = list(self.train.paths) + self.syn_paths
        self.labels = torch.cat([self.train.y, torch.as_tensor(self.syn_labels, dtype=torch.long)]).to(self.device)
        order = torch.randperm(len(self.paths), generator=g)
        return [torch.as_tensor(order[i : i + self.cfg.batch_size]) for i in range(0, len(order), self.cfg.batch_size)]

    def load(self, epoch, local_batches):
        """(positions, classifier inputs, LDM pixels) of each local batch (None where it is empty)."""
        if self.frozen and self.feats is None:
            self.feats = torch.cat([self.train.x, self.encode_files(self.syn_paths)])
        tf = None if self.frozen else self.backbone.preprocess
        ds = _Images(self.paths, tf, self.ldm_size())
        full = [b.tolist() for b in local_batches if len(b)]
        loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=full, num_workers=self.env.num_workers if len(full) > 4 else 0))
        for b in local_batches:
            yield next(loader) if len(b) else None

    def batch_loss(self, item, batch, info):
        cfg = self.cfg
        n_source = len(self.train)
        # the distilled images: the first distill_per_step source images of the global batch
        src_global = [int(i) for i in batch if int(i) < n_source][: cfg.distill_per_step]
        none = [Term("ld", None, 0, len(src_global), cfg.distill_weight), Term("ld_grad_rms", None, 0, len(src_global), 0.0)]
        if item is None:
            return [Term("ce", None, 0, len(batch))] + none
        pos, x_clf, x01 = item
        y = self.labels[pos.to(self.device)]
        f = self.feats[pos].to(self.device) if self.frozen else self.image_features(x_clf)
        logits = self.classify(f)
        terms = [Term("ce", F.cross_entropy(logits, y), len(pos), len(batch))]
        where = {int(i): j for j, i in enumerate(pos.tolist())}
        src = [s for s in src_global if s in where]
        if not (cfg.distill_weight and src):
            return terms + none
        ldm, size = self.ldm(), self.ldm_size()
        # t and ε are drawn for the global list and indexed: the same as on one process
        g = torch.Generator().manual_seed(self.env.seed * 1_000_003 + info.epoch * 10_007 + info.step)
        t_all = torch.randint(self.lo, self.hi + 1, (len(src_global),), generator=g)
        noise_all = torch.randn((len(src_global), ldm.unet.config.in_channels, size // self.vae_factor(), size // self.vae_factor()), generator=g)
        sel = torch.as_tensor([src_global.index(s) for s in src])
        rows = torch.as_tensor([where[s] for s in src], device=self.device)
        p = logits[rows].softmax(-1).gather(1, y[rows, None]).squeeze(1)  # p_θ(y|x)
        loss_ld, grad = latent_distillation_loss(ldm, p.to(ldm.device), x01[rows.cpu()].to(ldm.device), ldm.encode_text(self.prompts(y[rows])),
                                                 t_all[sel].to(ldm.device), noise_all[sel].to(ldm.device), cfg.distill_guidance, cfg.weighting)
        # the surrogate's value means nothing (only its gradient does): the size of w(t)(ε̂ − ε) is logged
        rms = grad.pow(2).mean().sqrt().detach()
        return terms + [Term("ld", loss_ld.to(self.device), len(src), len(src_global), cfg.distill_weight),
                        Term("ld_grad_rms", rms, len(src), len(src_global), 0.0)]

    def validate(self):
        return accuracy(self, self.val) if len(self.val) else None
