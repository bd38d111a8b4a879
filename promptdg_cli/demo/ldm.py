"""Pretrain the demo LDM: a tiny latent diffusion model of the demo world, conditioned on the demo CLIP.

Stable Diffusion is out of reach offline, so the demo world gets its own latent diffusion model,
built once by promptdg and cached like the demo CLIP (``pretrain.py``). It has Stable Diffusion's
parts in miniature and is saved in the diffusers layout (``vae/ unet/ scheduler/`` and
``promptdg_ldm.json``), so ``promptdg_cli.ldm.load_ldm`` treats it like any SD checkpoint:

* ``vae``: an ``AutoencoderKL`` from 3x32x32 pixels in [-1, 1] to 4x8x8 latents (factor 4),
  trained first on reconstruction (L1 + MSE) with a small KL term; its ``scaling_factor`` is then
  set to 1 / std of the training latents, so that scaled latents have unit variance as in SD.
* ``unet``: a ``UNet2DConditionModel`` on 8x8 latents with cross-attention to the per-token states
  of the demo CLIP's text tower (``clip_token_states``: a fixed ``DEMO_TEXT_LENGTH`` of 16
  positions, where SD uses 77; the CLIP stays frozen), trained second with the ε-prediction MSE
  at uniformly drawn timesteps of SD's schedule (``DDPMScheduler``: 1000 steps, scaled-linear betas
  0.00085..0.012), so DDIM img2img and score distillation work as with SD.

Data: like the demo CLIP's, the pretraining images are rendered with their own seed
(``LDM_SEED``, never the benchmark's 0) through ``world.sample_images`` (pretraining stream,
the other half of the handwriting scans): no benchmark image is ever seen. All four domains are
equally common (the LDM should be able to draw every style). Every time an image is drawn its
caption is drawn afresh: it always names the digit (no caption noise: the LDM should follow its
prompt), about half the time with a style word of its domain ("a photo of a seven", "a sketch of
the number seven", "seven", "digit 7"), half of them ending with a period; ``EMPTY_SHARE`` of the
captions are empty, which trains the unconditional model of classifier-free guidance. Each
distinct caption is encoded once.

Both stages use AdamW with a short warmup and cosine decay; the UNet's loss uses min-SNR-5
weighting (Hang et al., 2023), which speeds up convergence. The budget is a few minutes on two CPU
cores: for a given compute, a small UNet (32-64-64 channels) trained for many steps drew better
samples than a wider one trained for fewer.
Everything is seeded: a build is deterministic for a device. ``sample_quality`` (run at the end
of the build, stored in ``promptdg_ldm.json``) is the check that the LDM draws the digit it is
asked for: class-conditional samples from pure noise, classified zero-shot by the demo CLIP.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import _compat  # noqa: F401  (before diffusers: makes torchvision importable)

# isort: split
from ..compute_once import build_once
from ..devices import torch_threads
from ..extras import require
from ..ldm import DEMO_MARKER, DEMO_TEXT_LENGTH, LatentDiffusion, clip_token_states
from . import BUILD_THREADS
from .world import CLASSES, DOMAINS, STYLE_WORDS, sample_images

LDM_SEED = 2025  # never the benchmark's seed (0), nor the demo CLIP's (2024)
EMPTY_SHARE = 0.1  # unconditional captions, for classifier-free guidance
STYLED_SHARE = 0.5  # captions with a style word of the image's domain
TEMPLATES_STYLED = ["a {style} of a {name}", "a {style} of the number {name}", "a {style} of the digit {name}"]
TEMPLATES_PLAIN = ["{name}", "a {name}", "the number {name}", "the digit {name}", "digit {numeral}"]
QUALITY_TEMPLATE = "a photo of a {}"  # DomainFusion's class prompt (method.prompt)
# The recipe's revision is part of the cache folder's name (demo_ldm_dir): bump it when anything
# here changes, so that an LDM of an older recipe is never reused.
RECIPE_REVISION = 1
RECIPE = {
    "per_class": 150,  # pretraining images per domain and digit (6000 in all)
    "vae_channels": [16, 32, 64],
    "vae_steps": 250,
    "vae_batch": 64,
    "vae_lr": 2e-3,
    "kl_weight": 1e-4,  # per latent element, against the per-pixel reconstruction loss
    "unet_channels": [32, 64, 64],
    "unet_steps": 1300,
    "unet_batch": 128,
    "unet_lr": 2e-3,
    "min_snr_gamma": 5.0,
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "quality_per_class": 20,
    "quality_steps": 25,
    "quality_guidance": 7.5,
}


def demo_ldm_dir(cache_root: Optional[str] = None, clip=None) -> Path:
    """``<cache_root>/demo_ldm/demo-ldm-r<RECIPE_REVISION>`` (cache_root None: $PROMPTDG_CACHE or ~/.cache/promptdg),
    with ``-<8 hex digits of the CLIP's weights>`` when ``clip`` is given: an LDM conditioned on one demo CLIP's
    text tower is never reused with another's (a new demo CLIP recipe gets its own LDM)."""
    root = cache_root or os.environ.get("PROMPTDG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "promptdg")
    tag = "" if clip is None else "-" + hashlib.sha1(str(clip.identity()["weights"]).encode()).hexdigest()[:8]
    return Path(root).expanduser() / "demo_ldm" / f"demo-ldm-r{RECIPE_REVISION}{tag}"


def ensure_demo_ldm(cache_root: Optional[str], clip) -> Path:
    """The demo LDM folder for ``clip`` under ``cache_root``, built first if it is missing (once, when
    several processes need it at once: ``compute_once.build_once``)."""
    folder = demo_ldm_dir(cache_root, clip)
    build_once(folder, (folder / DEMO_MARKER).is_file, lambda: build_demo_ldm(folder, clip), "the demo LDM")
    return folder


# --------------------------------------------------------------------- data
def caption_pool(domain: str, digit: int) -> list[str]:
    """Every caption an image of ``digit`` in ``domain`` may get (without the empty one)."""
    name = CLASSES[digit]
    plain = [t.format(name=name, numeral=digit) for t in TEMPLATES_PLAIN]
    styled = [t.format(style=s, name=name) for t in TEMPLATES_STYLED for s in STYLE_WORDS[domain]]
    return [c + p for c in plain + styled for p in ("", ".")]


def _sample_captions(pools: list[list[int]], n_plain: list[int], labels: torch.Tensor, g: torch.Generator,
                     empty: int) -> torch.Tensor:
    """A caption index for each image of a batch (``labels``: its (domain, digit) pool index)."""
    u = torch.rand(len(labels), 3, generator=g)
    out = []
    for (r_empty, r_styled, r_pick), lab in zip(u.tolist(), labels.tolist()):
        pool, k = pools[lab], n_plain[lab]
        if r_empty < EMPTY_SHARE:
            out.append(empty)
        elif r_styled < STYLED_SHARE:
            out.append(pool[k + int(r_pick * (len(pool) - k))])
        else:
            out.append(pool[int(r_pick * k)])
    return torch.tensor(out)


def _lr_lambda(warmup: int, total: int):
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, total) / total))


def _text_states(clip, prompts: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([clip_token_states(clip, prompts[i : i + 256]) for i in range(0, len(prompts), 256)])


# --------------------------------------------------------------------- models
def _new_vae(recipe: dict):
    require("domainfusion")
    from diffusers import AutoencoderKL

    ch = list(recipe["vae_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=["DownEncoderBlock2D"] * len(ch), up_block_types=["UpDecoderBlock2D"] * len(ch),
        block_out_channels=ch, layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
    )


def _new_unet(recipe: dict, cross_attention_dim: int):
    require("domainfusion")
    from diffusers import UNet2DConditionModel

    ch = list(recipe["unet_channels"])
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=ch, layers_per_block=1,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(ch) - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (len(ch) - 1) + ["UpBlock2D"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def _new_scheduler():
    require("domainfusion")
    from diffusers import DDPMScheduler

    # Stable Diffusion's training schedule
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def _adamw(model, lr: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )


# --------------------------------------------------------------------- build
@torch_threads(BUILD_THREADS)  # the same weights at any caller's thread count (demo/__init__.py)
def build_demo_ldm(folder: Path, clip, recipe: dict | None = None) -> Path:
    """Train the demo LDM conditioned on ``clip``'s text tower and write it to ``folder`` (atomically).

    A folder that already has ``promptdg_ldm.json`` is returned as it is.
    """
    folder = Path(folder)
    if (folder / DEMO_MARKER).is_file():
        return folder
    recipe = {**RECIPE, **(recipe or {})}
    t0 = time.time()
    print(f"[promptdg] building the demo LDM once; it is cached at {folder}")
    device = clip.device
    torch.manual_seed(LDM_SEED)
    g = torch.Generator().manual_seed(LDM_SEED)

    # ---- data: pretraining renders, their (domain, digit) and the distinct captions' text states
    n_render = len(DOMAINS) * len(CLASSES) * recipe["per_class"]
    images, classes = [], []
    for domain, digit, im in tqdm(
        sample_images(LDM_SEED, recipe["per_class"]), total=n_render, desc="demo LDM: data", unit="img"
    ):
        images.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
        classes.append(DOMAINS.index(domain) * len(CLASSES) + digit)
    pixels = torch.stack(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (N, 3, 32, 32) in [-1, 1]
    labels = torch.tensor(classes)
    captions, pools, n_plain = [""], [], []
    for domain in DOMAINS:
        for digit in range(len(CLASSES)):
            pool = caption_pool(domain, digit)
            pools.append(list(range(len(captions), len(captions) + len(pool))))
            n_plain.append(2 * len(TEMPLATES_PLAIN))
            captions += pool
    states = _text_states(clip, captions).float()  # (n_captions, DEMO_TEXT_LENGTH, width)
    n = len(pixels)

    # ---- stage 1: the VAE
    vae = _new_vae(recipe).to(device).train()
    opt = _adamw(vae, recipe["vae_lr"], recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe["warmup_steps"], recipe["vae_steps"]))
    bar = tqdm(total=recipe["vae_steps"], desc="demo LDM: vae", unit="step")
    for _ in range(recipe["vae_steps"]):
        x = pixels[torch.randint(n, (recipe["vae_batch"],), generator=g)].to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + recipe["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, n, 512):
            d = vae.encode(pixels[i : i + 512].to(device)).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
        mean, std = torch.cat(means), torch.cat(stds)
    scale = float(1.0 / torch.sqrt(mean.var() + std.pow(2).mean()))  # 1 / std of the sampled latents
    vae.register_to_config(scaling_factor=scale)

    # ---- stage 2: the UNet on scaled latents
    scheduler = _new_scheduler()
    abar = scheduler.alphas_cumprod.to(device)
    unet = _new_unet(recipe, clip.text_width).to(device).train()
    opt = _adamw(unet, recipe["unet_lr"], recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe["warmup_steps"], recipe["unet_steps"]))
    bar = tqdm(total=recipe["unet_steps"], desc="demo LDM: unet", unit="step")
    for _ in range(recipe["unet_steps"]):
        idx = torch.randint(n, (recipe["unet_batch"],), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)).to(device) * scale
        cond = states[_sample_captions(pools, n_plain, labels[idx], g, empty=0)].to(device)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        eps = unet(z_t, t, encoder_hidden_states=cond).sample
        snr = abar[t] / (1 - abar[t])
        w = snr.clamp(max=recipe["min_snr_gamma"]) / snr  # min-SNR-γ weighting for ε-prediction
        loss = (w * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    train_s = time.time() - t0

    # ---- the check, then the folder (built next to its final place, renamed into it)
    ldm = LatentDiffusion(vae, unet, scheduler, lambda p: clip_token_states(clip, p), name="demo")  # as load_ldm
    quality = sample_quality(ldm, clip, list(CLASSES), per_class=recipe["quality_per_class"],
                             steps=recipe["quality_steps"], guidance=recipe["quality_guidance"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        vae.save_pretrained(tmp / "vae")
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        info = {
            "clip_model": clip.model_name,
            "clip_weights": clip.identity()["weights"],
            "text_length": DEMO_TEXT_LENGTH,
            "revision": RECIPE_REVISION,
            "seed": LDM_SEED,
            "recipe": recipe,
            "train_s": round(train_s, 1),
            "quality": quality,
        }
        (tmp / DEMO_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, folder, DEMO_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[promptdg] demo LDM trained in {train_s:.0f}s on {n} images; samples of '{QUALITY_TEMPLATE}' are "
          f"classified right by the demo CLIP {quality['top1']:.1f}% of the time (chance {quality['chance']:.0f}%)")
    return folder


def _install(tmp: Path, folder: Path, marker: str) -> None:
    """Rename the finished ``tmp`` to ``folder``; a concurrent builder that finished first wins."""
    if (folder / marker).is_file():
        return
    old = None
    if folder.exists() and not (folder / marker).is_file():  # a leftover, not a finished build: set it aside
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, old)
        except OSError:
            old = None
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / marker).is_file():  # lost a race only if the winner finished
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------- quality
@torch.no_grad()
def sample_quality(ldm, clip, classnames: Sequence[str], per_class: int = 20, steps: int = 25, guidance: float = 7.5,
                   seed: int = 0, template: str = QUALITY_TEMPLATE, batch: int = 100) -> dict:
    """How often the demo CLIP classifies the LDM's samples of a class as that class (zero-shot).

    ``per_class`` samples of each class are drawn from pure noise with DDIM (``steps`` steps,
    classifier-free ``guidance``) and prompted with ``template``; the decoded images are classified
    by ``clip`` zero-shot with "a photo of a {name}." as promptdg's zero-shot. Returns
    {"top1": %, "chance": %, "n": samples, "per_class", "steps", "guidance", "template"}.
    """
    require("domainfusion")
    from diffusers import DDIMScheduler

    names = list(classnames)
    weights = clip.zeroshot_weights(names, ["a photo of a {}."])  # (C, D)
    norm = next(t for t in getattr(clip.preprocess, "transforms", []) if type(t).__name__ == "Normalize")
    mean = torch.tensor(norm.mean, device=clip.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=clip.device).view(1, 3, 1, 1)
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    side = ldm.resolution // (2 ** (len(ldm.vae.config.block_out_channels) - 1))
    shape = (ldm.unet.config.in_channels, side, side)
    correct = 0
    for i in range(0, len(labels), batch):
        y = labels[i : i + batch]
        sched = DDIMScheduler.from_config(ldm.scheduler.config)
        sched.set_timesteps(steps, device=ldm.device)
        z = torch.randn((len(y), *shape), generator=g).to(ldm.device) * sched.init_noise_sigma
        cond = ldm.encode_text([template.format(names[k]) for k in y.tolist()])
        uncond = ldm.encode_text([""] * len(y)) if guidance != 1.0 else None
        for t in sched.timesteps:
            eps = ldm.predict_noise(z, t.expand(len(y)), cond, guidance, uncond)
            z = sched.step(eps, t, z).prev_sample
        x01 = (ldm.decode(z) + 1) / 2  # (B, 3, R, R) in [0, 1]
        x01 = x01.to(clip.device)
        if x01.shape[-1] != size:
            x01 = F.interpolate(x01, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        feats = clip.encode_image((x01 - mean) / std)
        correct += int(((feats @ weights.T).argmax(-1).cpu() == y).sum())
    return {"top1": round(100.0 * correct / len(labels), 2), "chance": round(100.0 / len(names), 2), "n": len(labels),
            "per_class": per_class, "steps": steps, "guidance": guidance, "template": template}
