"""Pretrain the demo CLIP: a tiny open_clip ViT trained contrastively on captioned demo-world images.

The demo world stands in for the web: the pretraining images are rendered with another seed than
the ``demo_digits`` benchmark and the world's "pretrain" split (no benchmark image or handwriting
scan is ever seen), and their captions name the digit and, for a share of them, the style
(``captions.py``). Photos and printed digits are common, sketches and handwriting rare
(``domain_mix``), so zero-shot transfer works yet leaves room on the rare domains.

The loss is CLIP's symmetric InfoNCE with a temperature, AdamW as CLIP (beta2 0.98, warm-up then
cosine, no weight decay on gains, biases, embeddings and the temperature). Two phases (``RECIPE``):
digit shapes first, on clean printed digits, then every domain in batches of 256 with the logit
scale raised to CLIP's 100 over 150 steps. Learned alone, the logit scale of this tiny model stays
near its initial 14 (measured: r2 ended at 14.8), and a flat softmax lets few pseudo-labels pass
DAPL's tau. The checkpoint's metadata holds the recipe and the properties measured on the
benchmark after the build (``properties.py``: zero-shot top-1 per domain, ECE, the share and
accuracy of predictions above tau = 0.6, the style-shift cosine PromptStyler relies on).
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List

import numpy as np

# isort: off
from .. import _compat  # noqa: F401  (must precede open_clip: makes torchvision importable)

# isort: on
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..backbone import ClipBackbone
from ..devices import torch_threads
from ..files import write_atomic
from . import BUILD_THREADS
from .captions import make_caption
from .properties import format_properties, measure_demo_clip
from .world import CLASSES, generate_dataset, render

PRETRAIN_SEED = 2024  # never the benchmark's seed (0)
# The recipe's revision is part of the checkpoint's file name (conf/backbone/demo_clip.yaml):
# bump both together when anything here changes, so that a cached checkpoint of an older recipe is
# never reused and runs made with it are never mistaken for finished runs of the new one.
RECIPE_REVISION = 3
RECIPE = {
    "images": 8000,
    # the web's mix: photos and printed digits common, sketches and handwriting rare (headroom there)
    "domain_mix": {"printed": 0.3, "photo": 0.5, "sketch": 0.1, "handwritten": 0.1},
    # Training phases, one after the other; each draws its batches from the domains it names (with
    # these weights; None: domain_mix) and captions with its own shares of noise, style words and
    # attribute phrases. First the digit shapes on clean printed digits (small batches, many
    # steps per image), then every domain in large batches with style words, where a sharp
    # temperature pays off (a batch of 256 holds few captions of the same meaning).
    "phases": [
        {"steps": 100, "batch_size": 64, "domains": {"printed": 1.0}, "caption_noise": 0.0, "style_share": 0.0,
         "attribute_share": 0.0},
        {"steps": 300, "batch_size": 256, "domains": None, "caption_noise": 0.0, "style_share": 0.2,
         "attribute_share": 0.0},
    ],
    "lr": 1e-3,
    "init_logit_scale": 1 / 0.07,  # CLIP's initial temperature
    "scale_lr": 1e-3,  # lr of the logit scale (None: lr)
    # [first step, last step, value]: the logit scale is raised geometrically to value over these steps
    # (not learned meanwhile), then learned again (clamped at CLIP's 100); None: learned throughout.
    # Learned alone it stays near its initial 14 on this world (a flat softmax: few pseudo-labels pass tau)
    "scale_ramp": [100, 250, 100],
    "weight_decay": 0.1,
    "warmup_steps": 30,
    "beta2": 0.98,
}


def _render_chunk(job: tuple) -> tuple[np.ndarray, list[dict]]:
    """``count`` images of one (domain, digit), from their own generator: (count, H, W, 3) uint8 and attributes."""
    domain, d_idx, digit, count, size = job
    rng = np.random.default_rng([PRETRAIN_SEED, d_idx, digit])
    pixels, attrs = np.empty((count, size, size, 3), dtype=np.uint8), []
    for i in range(count):
        a: dict = {}
        pixels[i] = np.asarray(render(domain, digit, rng, size=size, split="pretrain", attrs=a))
        attrs.append(a)
    return pixels, attrs


def pretraining_set(recipe: dict, size: int, workers: int | None = None):
    """(pixels (N, H, W, 3) uint8, domains, digits, render attributes), mixed over domains by ``recipe["domain_mix"]``.

    Rendered from PRETRAIN_SEED with the world's "pretrain" split: never a benchmark image nor a
    benchmark handwriting scan. Each (domain, digit) has its own generator, so the result does not
    depend on ``workers`` (processes; default: up to 2 CPUs).
    """
    jobs = [(domain, d_idx, digit, max(1, round(recipe["images"] * share / len(CLASSES))), size)
            for d_idx, (domain, share) in enumerate(recipe["domain_mix"].items()) for digit in range(len(CLASSES))]
    workers = workers or min(2, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            chunks = list(
                tqdm(pool.map(_render_chunk, jobs), total=len(jobs), desc="demo CLIP: rendering", unit="class")
            )
    else:
        chunks = [_render_chunk(j) for j in tqdm(jobs, desc="demo CLIP: rendering", unit="class")]
    domains = [j[0] for j in jobs for _ in range(j[3])]
    digits = [j[2] for j in jobs for _ in range(j[3])]
    return np.concatenate([c[0] for c in chunks]), domains, digits, [a for c in chunks for a in c[1]]


class BatchSampler:
    """Batches of image indices for each phase: a phase's domains are drawn by its weights (multinomial
    per batch), the images of a domain in a fresh random order each time the domain is exhausted."""

    def __init__(self, domains: list[str], seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.pool = {d: torch.tensor([i for i, x in enumerate(domains) if x == d]) for d in dict.fromkeys(domains)}
        self.queue = {d: torch.empty(0, dtype=torch.long) for d in self.pool}

    def _take(self, domain: str, k: int) -> torch.Tensor:
        while len(self.queue[domain]) < k:
            pool = self.pool[domain]
            self.queue[domain] = torch.cat([self.queue[domain], pool[torch.randperm(len(pool), generator=self.g)]])
        out, self.queue[domain] = self.queue[domain][:k], self.queue[domain][k:]
        return out

    def batch(self, weights: dict, size: int) -> torch.Tensor:
        names = [d for d in weights if weights[d] > 0]
        if any(d not in self.pool for d in names):
            raise KeyError(f"phase domains {names}: not all in the pretraining set's {list(self.pool)}")
        p = torch.tensor([float(weights[d]) for d in names])
        counts = torch.bincount(torch.multinomial(p, size, replacement=True, generator=self.g), minlength=len(names))
        idx = torch.cat([self._take(d, int(c)) for d, c in zip(names, counts) if c > 0])
        return idx[torch.randperm(len(idx), generator=self.g)]


def _to_pixels(images: np.ndarray, preprocess) -> torch.Tensor:
    """(N, 3, H, W) normalised like ``preprocess`` (images already at the model's size: only ToTensor + Normalize)."""
    norm = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)


def default_benchmark_root(path: Path) -> Path:
    """Where conf/dataset/demo_digits.yaml puts the benchmark for a checkpoint at conf/backbone/demo_clip.yaml's
    place (``<cache_root>/demo_clip/<file>`` -> ``<cache_root>/data/demo_digits``)."""
    path = Path(path)
    base = path.parent.parent if path.parent.name == "demo_clip" else path.parent
    return base / "data" / "demo_digits"


@torch_threads(BUILD_THREADS)  # the same weights at any caller's thread count (demo/__init__.py)
def build_demo_clip(
    path: Path, model_name: str, recipe: dict | None = None, benchmark_root: Path | None = None
) -> Path:
    """Train the demo CLIP, measure it (``properties.measure_demo_clip``) and write it to ``path``.

    safetensors, written atomically; its metadata holds the recipe, the seed and the measured
    properties (JSON under "properties"). The benchmark is generated at ``benchmark_root`` (default:
    ``default_benchmark_root(path)``) with the world's default arguments, only to be measured on.
    """
    recipe = {**RECIPE, **(recipe or {})}
    path = Path(path)
    if path.is_file():
        return path
    t0 = time.time()
    print(f"[promptdg] building the demo CLIP ({model_name}) once; it is cached at {path}")
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    images, domains, digits, attrs = pretraining_set(recipe, size)  # (rendering processes fork before training)
    torch.manual_seed(PRETRAIN_SEED)
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": that is the point here
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(model_name)
    clip = ClipBackbone(model, tokenizer, preprocess, model_name, "training", "vit")
    model.requires_grad_(True)
    model.train()
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(recipe["init_logit_scale"])))
    pixels = _to_pixels(images, preprocess)  # (N, 3, H, W)
    caption_rng = np.random.default_rng([PRETRAIN_SEED, 1])
    sampler = BatchSampler(domains, PRETRAIN_SEED)
    steps = sum(ph["steps"] for ph in recipe["phases"])
    # CLIP's AdamW: weight decay only on weight matrices (not gains, biases, embeddings, logit_scale).
    # The token embedding (49408 x width, of which captions use ~100 rows) gets sparse gradients and
    # a lazy Adam (SparseAdam: only the rows in the batch move): dense Adam on it costs ~25 % of a step.
    model.token_embedding.sparse = True
    decay: List[torch.Tensor] = []
    no_decay: List[torch.Tensor] = []
    for name, p in model.named_parameters():
        if name not in ("logit_scale", "token_embedding.weight"):
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    betas = (0.9, recipe["beta2"])
    opts = [
        torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0},
             {"params": [model.logit_scale], "weight_decay": 0.0, "lr": recipe["scale_lr"] or recipe["lr"]}],
            lr=recipe["lr"], betas=betas,
        ),
        torch.optim.SparseAdam([model.token_embedding.weight], lr=recipe["lr"], betas=betas),
    ]
    warm_cos = lambda s: min(1.0, (s + 1) / recipe["warmup_steps"]) * 0.5 * (1 + np.cos(np.pi * s / steps))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warm_cos) for o in opts]
    ramp = recipe["scale_ramp"]
    step = 0
    bar = tqdm(total=steps, desc="demo CLIP pretraining", unit="step")
    for phase in recipe["phases"]:
        weights = phase["domains"] or recipe["domain_mix"]
        kw = {k: phase[k] for k in ("caption_noise", "style_share", "attribute_share")}
        for _ in range(phase["steps"]):
            idx = sampler.batch(weights, phase["batch_size"])
            captions = [make_caption(domains[i], digits[i], attrs[i], caption_rng, noise=kw["caption_noise"],
                                     style_share=kw["style_share"], attribute_share=kw["attribute_share"])
                        for i in idx.tolist()]
            img = F.normalize(model.encode_image(pixels[idx]), dim=-1)  # (B, D)
            txt = clip.encode_text(tokenizer(captions))  # (B, D), truncated at the longest caption
            logits = model.logit_scale.exp() * img @ txt.T  # (B, B)
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sc in zip(opts, scheds):
                o.step()
                sc.step()
            with torch.no_grad():
                if ramp and ramp[0] <= step <= ramp[1]:
                    if step == ramp[0]:
                        start = float(model.logit_scale)
                    frac = (step - ramp[0] + 1) / (ramp[1] - ramp[0] + 1)
                    model.logit_scale.fill_(start + frac * (np.log(ramp[2]) - start))
                model.logit_scale.clamp_(0, np.log(100))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    train_s = time.time() - t0
    model.token_embedding.sparse = False
    model.eval().requires_grad_(False)
    root = generate_dataset(benchmark_root or default_benchmark_root(path))
    props = measure_demo_clip(clip, root)
    props["train_s"] = round(train_s, 1)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"recipe": json.dumps(recipe), "seed": str(PRETRAIN_SEED), "revision": str(RECIPE_REVISION),
            "properties": json.dumps(props)}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    print(format_properties(props))
    print(f"[promptdg] demo CLIP trained in {train_s:.0f}s on {len(images)} captioned images, measured in "
          f"{time.time() - t0 - train_s:.0f}s")
    return path


def checkpoint_properties(path: Path) -> dict:
    """The properties measured when the checkpoint at ``path`` was built (its safetensors metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "properties" not in meta:
        raise KeyError(f"{path}: no 'properties' in its metadata (built by an older recipe than r{RECIPE_REVISION}?)")
    return json.loads(meta["properties"])
