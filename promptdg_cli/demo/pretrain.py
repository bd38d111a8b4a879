"""Pretrain the demo CLIP: a tiny open_clip ViT trained contrastively on captioned digit images.

The demo world stands in for the web: the pretraining images are rendered with a different seed
than the ``demo_digits`` benchmark (no benchmark image is ever seen), and their captions name the
digit and sometimes the style, in varied templates ("seven", "a picture of a seven.", "a sketch of
the number seven", "a handwritten 7"); half end with a period, as web captions and CLIP prompts
do. As on the web, photos and printed digits are common and sketches and handwriting rare
(``DOMAIN_MIX``), and some captions are wrong (``CAPTION_NOISE``): so zero-shot transfer works
(clearly above chance) yet leaves room on the rarer domains for the methods to improve on.

The loss is CLIP's symmetric InfoNCE over the batch with a learned temperature, optimised with
AdamW as CLIP is (beta2 0.98, warmup then cosine decay, no weight decay on gains, biases,
embeddings and the temperature). Mostly plain captions (``PLAIN_SHARE``) make the digit the main
thing a caption says, which lets this tiny model learn digit shapes within its CPU budget
(with mostly styled captions it first learns only the style and stalls near chance).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .world import CLASSES, STYLE_WORDS, render

DOMAIN_MIX = {"printed": 0.35, "photo": 0.35, "sketch": 0.15, "handwritten": 0.15}
CAPTION_NOISE = 0.15  # fraction of captions that name a wrong digit
PLAIN_SHARE = 0.9  # fraction of captions without a style word
PERIOD_SHARE = 0.5  # fraction of captions ending with "." (as in "a photo of a seven.")
PRETRAIN_SEED = 2024  # never the benchmark's seed (0)
TEMPLATES_STYLED = [
    "a {style} of the number {name}",
    "a {style} of a {name}",
    "a {style} of the digit {name}",
    "the number {name}, {style}",
    "{style} {numeral}",
]
TEMPLATES_PLAIN = ["the number {name}", "{name}", "a {name}", "digit {numeral}", "a picture of a {name}"]
# The recipe's revision is part of the checkpoint's file name (conf/backbone/demo_clip.yaml):
# bump both together when anything here changes, so that a cached checkpoint of an older recipe is
# never reused and runs made with it are never mistaken for finished runs of the new one.
RECIPE_REVISION = 2
RECIPE = {
    "images": 8000,
    "epochs": 8,
    "batch_size": 64,
    "lr": 5e-4,
    "weight_decay": 0.1,
    "warmup_steps": 50,
    "beta2": 0.98,
}


def caption(domain: str, digit: int, rng: np.random.Generator) -> str:
    if rng.random() < CAPTION_NOISE:
        digit = int(rng.integers(10))
    name = CLASSES[digit]
    if rng.random() >= PLAIN_SHARE:
        style = STYLE_WORDS[domain][int(rng.integers(len(STYLE_WORDS[domain])))]
        t = TEMPLATES_STYLED[int(rng.integers(len(TEMPLATES_STYLED)))]
    else:
        style, t = "", TEMPLATES_PLAIN[int(rng.integers(len(TEMPLATES_PLAIN)))]
    text = t.format(style=style, name=name, numeral=digit)
    return text + "." if rng.random() < PERIOD_SHARE else text


def pretraining_set(n_images: int, size: int):
    """(PIL images, captions) for the demo CLIP, mixed over domains by DOMAIN_MIX."""
    rng = np.random.default_rng(PRETRAIN_SEED)
    images, captions = [], []
    for d_idx, (domain, share) in enumerate(DOMAIN_MIX.items()):
        for digit in range(len(CLASSES)):
            render_rng = np.random.default_rng([PRETRAIN_SEED, d_idx, digit])
            for _ in range(max(1, round(n_images * share / len(CLASSES)))):
                images.append(render(domain, digit, render_rng, size=size, split="pretrain"))
                captions.append(caption(domain, digit, rng))
    return images, captions


def build_demo_clip(path: Path, model_name: str, recipe: dict | None = None) -> Path:
    """Train the demo CLIP and write its weights to ``path`` (safetensors, atomically)."""
    import open_clip

    from ..backbone import ClipBackbone  # noqa: WPS433 (import cycle: backbone builds the demo)

    recipe = {**RECIPE, **(recipe or {})}
    path = Path(path)
    if path.is_file():
        return path
    t0 = time.time()
    print(f"[promptdg] building the demo CLIP ({model_name}) once; it is cached at {path}")
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
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    images, captions = pretraining_set(recipe["images"], size)
    pixels = torch.stack([preprocess(im) for im in images])  # (N, 3, H, W)
    tokens = tokenizer(captions)  # (N, 77)
    n, bs = len(pixels), recipe["batch_size"]
    steps = recipe["epochs"] * (n // bs)
    # CLIP's AdamW: weight decay only on weight matrices (not gains, biases, embeddings, logit_scale)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
        betas=(0.9, recipe["beta2"]),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / recipe["warmup_steps"]) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    g = torch.Generator().manual_seed(PRETRAIN_SEED)
    bar = tqdm(total=steps, desc="demo CLIP pretraining", unit="step")
    for _ in range(recipe["epochs"]):
        order = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = order[i : i + bs]
            img = F.normalize(model.encode_image(pixels[idx]), dim=-1)  # (B, D)
            txt = clip.encode_text(tokens[idx])  # (B, D), truncated at the longest caption
            logits = model.logit_scale.exp() * img @ txt.T  # (B, B)
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"recipe": json.dumps(recipe), "seed": str(PRETRAIN_SEED)})
    os.replace(tmp, path)
    print(f"[promptdg] demo CLIP trained in {time.time() - t0:.0f}s on {n} captioned images")
    return path
