"""A frozen latent diffusion model (LDM): loading, text conditioning, noise prediction, img2img.

``LatentDiffusion`` holds the four parts of a Stable Diffusion checkpoint (the VAE, the
text-conditioned UNet, the noise scheduler and a text encoder) and exposes exactly what
DomainFusion needs:

* ``encode(x)``: pixels in [-1, 1] -> scaled VAE latents. Gradients may flow through it w.r.t.
  its *input* (latent distillation pushes the score-distillation gradient back to the image);
  the VAE's own weights never require gradients.
* ``predict_noise(z_t, t, cond, guidance)``: the UNet's ε̂ with classifier-free guidance, always
  under ``torch.no_grad`` (score distillation never differentiates the UNet).
* ``img2img(x, prompts, strength, ...)``: SDEdit-style image-to-image with DDIM, returning latents
  (DomainFusion decomposes candidates in latent space and decodes only the image it keeps).

Sources, by ``method.ldm``:

* a local folder in the diffusers layout of Stable Diffusion v1.x / v2.x
  (``vae/ unet/ text_encoder/ tokenizer/ scheduler/``, e.g. a ``save_pretrained`` of
  ``StableDiffusionPipeline`` or a hub snapshot);
* a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), looked up in the local Hugging Face
  cache only: there is no download during a run, and a missing model fails in seconds with the
  command that puts it there;
* ``demo``: the tiny demo LDM, pretrained by promptdg on the demo world on first use
  (``promptdg_cli/demo/ldm.py``) and conditioned on the demo CLIP's text tower.

Every weight is frozen (``requires_grad_(False)``, eval mode). ``dtype`` ``auto`` is fp16 on a GPU
and fp32 on the CPU; ``bf16`` is available where the GPU supports it. Numbers:

* the VAE runs in fp32 where its config asks for it (``force_upcast``: diffusers' default, kept by SD
  v1.5's config; its activations overflow fp16), and its encoder is differentiated in fp32 in any case
  (latent distillation's backward through an fp16 encoder has no loss scale: its gradients underflow);
* the LDM's own dtype holds inside a run's autocast: every call here runs with autocast off, so a
  ``backbone.precision=bf16`` step does not recast the fp16 UNet to bf16;
* values that left the floating-point range stop the run with :class:`NonFiniteError`, naming the
  step, instead of being saved as black images or stepping the classifier with NaN.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _compat  # noqa: F401  (before diffusers: makes torchvision importable)

# isort: split
from .errors import ConfigError, LDMNotFound
from .extras import require

SD_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
DEMO_TEXT_LENGTH = 16  # token positions of the demo LDM's text conditioning
DEMO_MARKER = "promptdg_ldm.json"  # a promptdg-built LDM: its text encoder is a CLIP backbone's text tower


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"method.ldm_dtype={name!r} is not a dtype. Valid: auto, fp32, fp16, bf16")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            "method.ldm_dtype=fp16 needs a GPU (fp16 convolutions are slow or missing on the CPU); use auto or fp32"
        )
    return table[name]


class NonFiniteError(FloatingPointError):
    """An LDM step produced NaN or inf (fp16's range, a broken checkpoint)."""


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    """``x`` if every value is finite, else :class:`NonFiniteError` naming the step ``what``."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = int(bad.flatten(1).any(1).sum()) if x.dim() > 1 else int(bad.sum())
        raise NonFiniteError(
            f"{what}: NaN or inf in {rows} of {x.shape[0] if x.dim() > 1 else x.numel()} items (the LDM runs in "
            f"{str(dtype).replace('torch.', '')}). "
            f"method.ldm_dtype=fp32 (or bf16, fp32's range) avoids fp16's overflow."
        )
    return x


def _no_autocast(device: torch.device):
    """The LDM's calls keep its own dtype inside a run's autocast (bf16 would recast an fp16 UNet)."""
    return torch.autocast(device.type, enabled=False)


def clip_token_states(clip, prompts: Sequence[str], length: int = DEMO_TEXT_LENGTH) -> torch.Tensor:
    """Per-token text states of an open_clip text tower, (B, length, width), ``ln_final`` applied.

    This is the demo LDM's text conditioning (Stable Diffusion conditions on the per-token states of
    its CLIP text encoder in the same way). The sequence is cut at a fixed ``length`` (16 covers
    every demo prompt) instead of CLIP's 77: under the causal mask the positions kept are unchanged,
    and cross-attention over 16 keys instead of 77 is ~5x cheaper. The length is fixed, not the
    batch's longest prompt, so that a prompt's conditioning never depends on its batch.
    """
    m = clip.model
    tokens = clip.tokenize(prompts)
    longest = int(clip.eot_positions(tokens).max()) + 1
    if longest > length:
        raise ConfigError(
            f"a prompt of {longest} tokens is longer than the demo LDM's text length {length}: {list(prompts)[:3]}"
        )
    x = clip.token_embedding(tokens[:, :length]) + m.positional_embedding[:length]
    mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
    x = m.transformer(x, attn_mask=mask)
    return m.ln_final(x)


class LatentDiffusion(nn.Module):
    """A frozen LDM. ``text_encoder``: a callable ``list[str] -> (B, L, D)`` hidden states."""

    def __init__(
        self,
        vae,
        unet,
        scheduler,
        text_encoder: Callable[[Sequence[str]], torch.Tensor],
        name: str,
        dtype=torch.float32,
    ):
        super().__init__()
        self.vae, self.unet, self.scheduler = vae, unet, scheduler
        self._text = text_encoder
        self.name, self.dtype = name, dtype
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # (its config asks for fp32: fp16 activations overflow)
        for part in (vae, unet):
            part.requires_grad_(False)
            part.eval()
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self._text_cache: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def resolution(self) -> int:
        """The image side the LDM works at (its VAE's ``sample_size``)."""
        s = self.vae.config.sample_size
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    # ----------------------------------------------------------------- text
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) conditioning states; each distinct prompt is encoded once per model."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with _no_autocast(self.device):
                states = self._text(missing).to(self.device, self.dtype)
            for p, s in zip(missing, states):
                self._text_cache[p] = s
        return torch.stack([self._text_cache[p] for p in prompts])

    # ----------------------------------------------------------------- latents
    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _vae_for_grad(self):
        """The VAE whose encoder a gradient goes through: fp32 (an fp32 copy of an fp16 VAE, made once)."""
        if self.vae_dtype != torch.float16:
            return self.vae
        if getattr(self, "_vae32", None) is None:
            object.__setattr__(self, "_vae32", copy.deepcopy(self.vae).float())  # (not a registered submodule)
        return self._vae32

    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> scaled latents (B, c, H/f, W/f).

        The posterior mean, or a sample of it when a generator is given. Differentiable w.r.t. ``x``
        (then in fp32: an fp16 encoder's backward, unscaled, would underflow).
        """
        vae = self._vae_for_grad() if torch.is_grad_enabled() and x.requires_grad else self.vae
        with _no_autocast(self.device):
            dist = vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist
            z = dist.mean if generator is None else dist.sample(generator=generator)
        return z.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1] (in fp32 where the VAE's config asks for it: ``force_upcast``,
        diffusers' default, which SD v1.5's config keeps; its decoder's activations overflow fp16's range)."""
        with _no_autocast(self.device):
            return self.vae.decode((z / self.scaling_factor).to(self.vae_dtype)).sample.float().clamp(-1, 1)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t) ε (the forward process), differentiable w.r.t. z0."""
        a = self.alphas_cumprod()[t].view(-1, *([1] * (z0.dim() - 1)))
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float = 1.0,
                      uncond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ε̂(z_t, t, c) with classifier-free guidance: ε̂_u + g (ε̂_c − ε̂_u); g = 1 is plain conditional."""
        t = t.to(self.device).expand(z_t.shape[0]) if t.dim() == 0 else t.to(self.device)
        if guidance == 1.0:
            with _no_autocast(self.device):
                return self.unet(z_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample.float()
        if uncond is None:
            uncond = self.encode_text([""] * z_t.shape[0])
        with _no_autocast(self.device):
            eps = self.unet(torch.cat([z_t, z_t]).to(self.dtype), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([uncond, cond]).to(self.dtype)).sample.float()
        e_u, e_c = eps.chunk(2)
        return e_u + guidance * (e_c - e_u)

    @torch.no_grad()
    def img2img(self, x: torch.Tensor, prompts: Sequence[str], strength: float, steps: int, guidance: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """SDEdit with DDIM: noise the image's latent to ``strength`` of the schedule and denoise it
        with the prompts. Returns the final latents (decode them with ``decode``)."""
        require("domainfusion")
        from diffusers import DDIMScheduler

        if not 0 < strength <= 1:
            raise ConfigError(f"method.strength={strength} must be in (0, 1]")
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        n_run = max(1, min(steps, int(round(steps * strength))))
        timesteps = sched.timesteps[steps - n_run:]
        z0 = self.encode(x.to(self.device))
        noise = torch.randn(z0.shape, generator=generator, device=generator.device if generator else None).to(z0)
        z = self.add_noise(z0, noise, timesteps[:1].expand(z0.shape[0]))
        cond = self.encode_text(prompts)
        uncond = self.encode_text([""] * len(prompts)) if guidance != 1.0 else None
        for t in timesteps:
            eps = self.predict_noise(z, t.expand(z.shape[0]), cond, guidance, uncond)
            z = sched.step(eps, t, z).prev_sample
        return z.float()


# --------------------------------------------------------------------- loading
def _hub_snapshot(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """A hub model's local snapshot folder, or None (never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=[f"{p}/*" for p in SD_PARTS] + ["model_index.json"]))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, bad repo ids, ...
        return None


def _check_layout(folder: Path, source: str, parts: Sequence[str]) -> None:
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise LDMNotFound(
            f"method.ldm={source!r}: {folder} lacks {', '.join(p + '/' for p in missing)}. A Stable Diffusion "
            f"v1.x/v2.x checkpoint in the diffusers layout has the folders {', '.join(p + '/' for p in SD_PARTS)} "
            f"(e.g. StableDiffusionPipeline.from_pretrained(...).save_pretrained(folder))."
        )


def locate(source: str, revision: Optional[str] = None) -> Path:
    """The folder of ``method.ldm`` (a local folder or a hub id in the local cache), or LDMNotFound."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return path
    looks_like_hub = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_hub:
        snap = _hub_snapshot(source, revision)
        if snap is not None:
            return snap
        raise LDMNotFound(
            f"method.ldm={source!r} is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}) and runs never download. On a machine "
            f"with network: `huggingface-cli download {source} --include 'vae/*' 'unet/*' 'text_encoder/*' "
            f"'tokenizer/*' 'scheduler/*' model_index.json`, or save the pipeline to a folder and pass "
            f"method.ldm=/path/to/folder. Without weights, the demo world has its own: method.ldm=demo."
        )
    raise LDMNotFound(
        f"method.ldm={source!r}: no such folder. Give a local Stable Diffusion folder (diffusers layout: "
        f"{', '.join(p + '/' for p in SD_PARTS)}), a hub id in the local cache (e.g. "
        f"stable-diffusion-v1-5/stable-diffusion-v1-5), or demo."
    )


def load_ldm(source: str, device: torch.device, dtype: str = "auto", revision: Optional[str] = None,
             clip=None) -> LatentDiffusion:
    """Load a frozen LDM from a folder or a hub id in the local cache. ``clip``: the CLIP backbone whose
    text tower conditions a promptdg-built LDM (the demo LDM, which ``demo/ldm.py`` builds into a
    folder first)."""
    require("domainfusion")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch_dtype = resolve_dtype(dtype, device)
    folder = locate(source, revision)
    marker = folder / DEMO_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if clip is None or info.get("clip_model") != clip.model_name:
            raise ConfigError(
                f"{folder} is conditioned on the text tower of {info.get('clip_model')}; use it with that backbone"
            )
        if info.get("clip_weights") not in (None, clip.identity()["weights"]):
            raise ConfigError(
                f"{folder} is conditioned on the text tower of the CLIP weights {info['clip_weights']}, not on "
                f"{clip.identity()['weights']}; build the demo LDM for these weights (method.ldm=demo) "
                f"or load the CLIP it was built on"
            )
        _check_layout(folder, source, ("vae", "unet", "scheduler"))
        text = lambda prompts: clip_token_states(clip, prompts)  # noqa: E731
    else:
        from transformers import CLIPTextModel, CLIPTokenizer

        _check_layout(folder, source, SD_PARTS)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        encoder = (
            CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch_dtype)
            # (PreTrainedModel.to is wrapped by functools.wraps, whose stub mypy does not bind: device reads as self)
            .to(device)  # type: ignore[arg-type]
            .eval()
        )
        encoder.requires_grad_(False)

        def text(prompts):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            return encoder(ids).last_hidden_state

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch_dtype, low_cpu_mem_usage=False).to(device)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch_dtype, low_cpu_mem_usage=False).to(
        device
    )
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    return LatentDiffusion(vae, unet, scheduler, text, name=source, dtype=torch_dtype)


def to_ldm_pixels(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the LDM's [-1, 1]."""
    return x01 * 2 - 1


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return (
        x
        if x.shape[-1] == size and x.shape[-2] == size
        else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    )
