"""promptdg benchmark (``make bench``): what the truncated text path and the feature cache buy.

Both measurements use the ViT-B/16 CLIP architecture with random weights (timing does not depend
on the weights) and are reported as ratios measured in the same process:

1. text encoder forward+backward through learned prompts (CoOp's 16 context vectors, the 65
   Office-Home class names): all 77 positions vs. truncated at the last end-of-text token;
2. a CoOp training epoch on cached image features vs. the same epoch re-encoding every image batch
   with the frozen image encoder (what implementations without a feature cache do);
3. one PromptStyler style-learning iteration with DomainNet's N = 345 classes: the style prompt and
   the N style-content prompts in one batch, truncated at the last end-of-text token, earlier
   styles' features stored, vs. the naive computation (all 77 positions, and the i-1 earlier style
   prompts re-encoded every iteration; measured at i = K/2, the average over a run). The projected
   stage-1 time is K x L x (time per iteration), K = 80 styles, L = 100 iterations;
4. a DAPL epoch (Office-Home's 65 classes, one source + the target domain, 32 + 32 images a step) on
   cached image features vs. the same epoch re-encoding both image batches every step with the
   frozen image encoder (the public implementation's way);
5. one DAPT training step (batch 32, 16 visual prompt tokens through the ViT-B/16 image tower,
   16 text context tokens for 65 classes, forward + backward + SGD step), with its memory peak;
6. and 7. DomainFusion (see their functions);
8. shared-prefix prompts: text forward+backward of DAPL-shaped prompts (65 Office-Home classes x 2
   domains, ``[SOS][16 ctx][16 dom] {class}, a {domain} image.[EOT]``) through all 77 positions, the
   plain truncated path and the shared-prefix path (each domain's 33 leading positions once), with
   the features checked equal; and one PromptStyler iteration at N = 345 (prefix "a S style of a",
   suffix the class tokens), plain truncated vs shared prefix.

Usage: python scripts/bench.py [--out bench/bench.json] [--device cpu] [--repeats 3] [--only text,coop,promptstyler,dapl,dapt,shared_prefix]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import promptdg_cli.backbone  # noqa: F401  (torchvision shim before open_clip)
import open_clip
import torch
from omegaconf import OmegaConf

from promptdg_cli.backbone import ClipBackbone
from promptdg_cli.shared_prefix import PromptGroups
from promptdg_cli.config import conf_dir
from promptdg_cli.methods.coop import CoOp, CoOpConfig
from promptdg_cli.methods.dapl import DAPL, DAPLConfig, dapl_loss
from promptdg_cli.methods.dapt import DAPT, DAPTConfig
from promptdg_cli.methods.promptstyler import (
    PLACEHOLDER,
    PromptStyler,
    PromptStylerConfig,
    content_consistency_loss,
    style_diversity_loss,
)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/bench.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-16-quickgelu")
    ap.add_argument("--batches", type=int, default=4, help="batches in the timed CoOp 'epoch'")
    ap.add_argument("--only", default="text,coop,promptstyler,dapl,dapt,domainfusion,domainfusion_count,shared_prefix",
                    help="comma-separated sections to run")
    ap.add_argument("--dapt-batch", type=int, default=32)
    ap.add_argument("--df-batch", type=int, default=4, help="images per DomainFusion img2img / distillation batch")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None, device=device)
    clip = ClipBackbone(model, open_clip.get_tokenizer(args.model), preprocess, args.model, "random", "vit")
    names = list(OmegaConf.load(conf_dir() / "dataset" / "officehome.yaml").classes.values())
    coop = CoOp(OmegaConf.structured(CoOpConfig()), clip, names, device)
    result = {"model": args.model, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "host": platform.node(), "classes": len(names), "n_ctx": 16}

    if "text" in only:
        text_section(result, clip, coop, names, device, args)
    if "coop" in only:
        coop_section(result, clip, coop, model, names, device, args)
    if "promptstyler" in only:
        promptstyler_section(result, clip, device, args)
    if "dapl" in only:
        dapl_section(result, clip, model, names, device, args)
    if "dapt" in only:
        dapt_section(result, clip, model, names, device, args)
    if "domainfusion" in only:
        domainfusion_section(result, device, args)
    if "domainfusion_count" in only:
        domainfusion_count_section(result)
    if "shared_prefix" in only:
        shared_prefix_section(result, clip, names, device, args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def text_section(result, clip, coop, names, device, args):
    """1. text encoder forward+backward, truncated vs all 77 positions."""
    prompts = coop.prompt()  # (C, L, W), L = last EOS + 1
    eot = coop.prompt.eot
    pad = clip.token_embedding(torch.zeros(len(names), clip.context_length - prompts.shape[1], dtype=torch.long, device=device))
    full_prompts = lambda: torch.cat([coop.prompt(), pad], dim=1)  # noqa: E731  (C, 77, W)

    def step(truncate: bool):
        coop.prompt.ctx.grad = None
        p = coop.prompt() if truncate else full_prompts()
        clip.encode_prompts(p, eot, truncate=truncate).sum().backward()

    full_s = timed(lambda: step(False), args.repeats, device)
    trunc_s = timed(lambda: step(True), args.repeats, device)
    result["text_fwd_bwd"] = {
        "positions_full": clip.context_length,
        "positions_truncated": int(eot.max()) + 1,
        "full_s": round(full_s, 4),
        "truncated_s": round(trunc_s, 4),
        "speedup": round(full_s / trunc_s, 2),
    }
    print(f"text fwd+bwd, {len(names)} prompts: 77 positions {full_s:.3f}s, "
          f"{int(eot.max()) + 1} positions {trunc_s:.3f}s -> {full_s / trunc_s:.2f}x", flush=True)



def coop_section(result, clip, coop, model, names, device, args):
    """2. CoOp epoch: cached features vs re-encoding images."""
    bs, n = 32, 32 * args.batches
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    images = torch.randn(n, 3, size, size, device=device)
    labels = torch.randint(len(names), (n,), device=device)
    with torch.no_grad():
        cached = torch.cat([clip.encode_image(images[i : i + bs]) for i in range(0, n, bs)])
    opt = torch.optim.SGD([coop.prompt.ctx], lr=0.002, momentum=0.9)

    def epoch(use_cache: bool):
        for i in range(0, n, bs):
            if use_cache:
                x = cached[i : i + bs]
            else:
                with torch.no_grad():
                    x = clip.encode_image(images[i : i + bs])
            loss = coop.loss(x, labels[i : i + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    reencode_s = timed(lambda: epoch(False), max(1, args.repeats - 1), device)
    cached_s = timed(lambda: epoch(True), args.repeats, device)
    result["coop_epoch"] = {
        "images": n,
        "batch_size": bs,
        "reencode_s": round(reencode_s, 4),
        "cached_s": round(cached_s, 4),
        "speedup": round(reencode_s / cached_s, 2),
    }
    print(f"CoOp epoch of {n} images: re-encoding {reencode_s:.3f}s, cached features {cached_s:.3f}s "
          f"-> {reencode_s / cached_s:.2f}x", flush=True)


def promptstyler_section(result, clip, device, args):
    """3. One style-learning iteration, N = 345 (DomainNet): ours vs the naive full computation."""
    names = list(OmegaConf.load(conf_dir() / "dataset" / "domainnet.yaml").classes.values())
    cfg = OmegaConf.structured(PromptStylerConfig())
    ps = PromptStyler(cfg, clip, names, device)
    k, iters = cfg.n_styles, cfg.style_iters
    i = k // 2  # the style being learned; i earlier styles exist (the run's average is (K-1)/2)
    with torch.no_grad():
        content = clip.encode_text(names)  # computed once per run in both variants
        earlier_words = torch.randn(i, clip.text_width, device=device) * 0.02
        earlier_feats = torch.stack([ps.encode(w)[0] for w in earlier_words])
    style = torch.nn.Parameter(torch.randn(clip.text_width, device=device) * 0.02)
    opt = torch.optim.SGD([style], lr=cfg.style_lr, momentum=cfg.style_momentum)
    pad_len = clip.context_length - ps.prompts.embeddings.shape[1]
    pad = clip.token_embedding(torch.zeros(len(names) + 1, pad_len, dtype=torch.long, device=device))
    # the naive style prompt of each earlier style, all 77 positions
    style_only = ps.prompts.embeddings[:1]
    style_pad = pad[:1]

    def ours():
        f_style, f_sc = ps.encode(style)
        loss = style_diversity_loss(f_style, earlier_feats) + content_consistency_loss(f_sc, content)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def naive():
        full = torch.cat([ps.prompts(style), pad], dim=1)  # (N+1, 77, W)
        f = clip.encode_prompts(full, ps.prompts.eot, truncate=False)
        with torch.no_grad():  # earlier styles re-encoded every iteration
            e = style_only.expand(i, -1, -1).clone()
            e[:, ps.prompts.position] = earlier_words
            prev = clip.encode_prompts(torch.cat([e, style_pad.expand(i, -1, -1)], dim=1), ps.prompts.eot[:1].expand(i), truncate=False)
        loss = style_diversity_loss(f[0], prev) + content_consistency_loss(f[1:], content)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def full77():  # all 77 positions, earlier features stored: separates the two savings
        f = clip.encode_prompts(torch.cat([ps.prompts(style), pad], dim=1), ps.prompts.eot, truncate=False)
        loss = style_diversity_loss(f[0], earlier_feats) + content_consistency_loss(f[1:], content)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    naive_s = timed(naive, max(1, args.repeats - 2), device)
    full77_s = timed(full77, max(1, args.repeats - 2), device)
    ours_s = timed(ours, args.repeats, device)
    positions = int(ps.prompts.eot.max()) + 1
    result["promptstyler_iteration"] = {
        "classes": len(names),
        "styles": k,
        "iterations_per_style": iters,
        "earlier_styles_at_measurement": i,
        "positions_truncated": positions,
        "positions_full": clip.context_length,
        "naive_s": round(naive_s, 4),
        "full77_stored_earlier_s": round(full77_s, 4),
        "ours_s": round(ours_s, 4),
        "speedup": round(naive_s / ours_s, 2),
        "speedup_truncation_only": round(full77_s / ours_s, 2),
        "projected_stage1_ours_h": round(k * iters * ours_s / 3600, 3),
        "projected_stage1_naive_h": round(k * iters * naive_s / 3600, 3),
    }
    print(f"PromptStyler style iteration, N={len(names)}: naive (77 positions, {i} earlier styles re-encoded) "
          f"{naive_s:.3f}s, 77 positions with stored features {full77_s:.3f}s, ours ({positions} positions, one batch, "
          f"stored features) {ours_s:.3f}s -> {naive_s / ours_s:.2f}x ({full77_s / ours_s:.2f}x from truncation alone); projected stage 1 (K={k} x L={iters}): ours {k * iters * ours_s / 3600:.2f} h, "
          f"naive {k * iters * naive_s / 3600:.2f} h on {device}", flush=True)


def dapl_section(result, clip, model, names, device, args):
    """4. DAPL epoch: cached features vs re-encoding the source and target image batches every step."""
    dapl = DAPL(OmegaConf.structured(DAPLConfig()), clip, names, device)
    dapl.setup(["source", "target"], "target", seed=0)
    bs, n = 32, 32 * args.batches
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    src, tgt = torch.randn(n, 3, size, size, device=device), torch.randn(n, 3, size, size, device=device)
    y = torch.randint(len(names), (n,), device=device)
    pseudo, keep = torch.randint(len(names), (n,), device=device), torch.rand(n, device=device) > 0.3
    with torch.no_grad():
        cached_s = torch.cat([clip.encode_image(src[i : i + bs]) for i in range(0, n, bs)])
        cached_t = torch.cat([clip.encode_image(tgt[i : i + bs]) for i in range(0, n, bs)])
    opt = torch.optim.SGD([dapl.prompt.ctx, dapl.prompt.dom], lr=0.003, momentum=0.9)
    domain = torch.zeros(bs, dtype=torch.long, device=device)

    def epoch(use_cache: bool):
        for i in range(0, n, bs):
            if use_cache:
                xs, xt = cached_s[i : i + bs], cached_t[i : i + bs]
            else:
                with torch.no_grad():
                    xs, xt = clip.encode_image(src[i : i + bs]), clip.encode_image(tgt[i : i + bs])
            loss = dapl_loss(dapl.text_features(), clip.logit_scale, xs, domain, y[i : i + bs], xt, 1, pseudo[i : i + bs], keep[i : i + bs], 1.0)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    reencode_s = timed(lambda: epoch(False), max(1, args.repeats - 1), device)
    cached_s_time = timed(lambda: epoch(True), args.repeats, device)
    result["dapl_epoch"] = {
        "classes": len(names), "domains": 2, "steps": n // bs, "source_batch": bs, "target_batch": bs,
        "reencode_s": round(reencode_s, 4), "cached_s": round(cached_s_time, 4),
        "speedup": round(reencode_s / cached_s_time, 2),
    }
    print(f"DAPL epoch of {n // bs} steps (32 source + 32 target images, {len(names)} classes x 2 domains of prompts): "
          f"re-encoding {reencode_s:.3f}s, cached features {cached_s_time:.3f}s -> {reencode_s / cached_s_time:.2f}x", flush=True)


def dapt_section(result, clip, model, names, device, args):
    """5. One DAPT step through the prompted image tower and the text side, with its memory peak."""
    import resource

    dapt = DAPT(OmegaConf.structured(DAPTConfig()), clip, names, device)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    bs = args.dapt_batch
    images = torch.randn(bs, 3, size, size, device=device)
    y = torch.randint(len(names), (bs,), device=device)
    protos = torch.nn.functional.normalize(torch.randn(len(names), clip.embed_dim, device=device), dim=-1)
    opt = torch.optim.SGD([dapt.prompt.ctx, dapt.visual.prompts], lr=0.002, momentum=0.9)

    def step():
        loss = dapt.loss(images, y, protos, 10.0, 0.01)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_s = timed(step, max(1, args.repeats - 1), device)
    peak = {"cpu_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cpu_max_rss_before_mb": round(rss_before, 1)}
    if device.type == "cuda":
        peak["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["dapt_step"] = {"batch": bs, "visual_prompts": 16, "text_ctx": 16, "classes": len(names),
                           "step_s": round(step_s, 4), "memory": peak}
    print(f"DAPT training step, batch {bs} (ViT-B/16 with 16 visual prompts + 16-token text context, {len(names)} classes): "
          f"{step_s:.3f}s; memory peak {peak}", flush=True)


def domainfusion_section(result, device, args):
    """6. DomainFusion on the SD-1.x architecture (random weights) at 256 px: img2img candidates per
    second (strength 0.5, 20 DDIM steps, CFG) and latent-distillation steps per second (VAE encoder
    forward + backward, one guided UNet call), in the dtype a run would use (fp16 on a GPU)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from promptdg_cli.ldm import LatentDiffusion, resolve_dtype
    from promptdg_cli.methods.domainfusion import DomainFusionConfig, latent_distillation_loss

    cfg = DomainFusionConfig()
    dtype = resolve_dtype("auto", device)
    torch.manual_seed(0)
    vae = AutoencoderKL(  # Stable Diffusion v1.x's VAE
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
    ).to(device, dtype)
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768).to(device, dtype)  # SD v1.x's UNet
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    text = lambda prompts: torch.randn(len(prompts), 77, 768)  # noqa: E731 - CLIP ViT-L/14 text states (cached per class in a run)
    ldm = LatentDiffusion(vae, unet, sched, text, "sd1-random", dtype)
    bs = args.df_batch
    x01 = torch.rand(bs, 3, 256, 256, device=device)
    prompts = [f"a photo of a class{i}" for i in range(bs)]
    g = torch.Generator(device=device).manual_seed(0)
    i2i = timed(lambda: ldm.img2img(x01 * 2 - 1, prompts, cfg.strength, cfg.img2img_steps, cfg.img2img_guidance, g), 1, device)
    head = torch.nn.Linear(16, 10).to(device)
    feats = torch.randn(bs, 16, device=device)
    cond = ldm.encode_text(prompts)

    def distill():
        p = head(feats).softmax(-1)[:, 0]
        t = torch.randint(20, 980, (bs,), device=device)
        loss, _ = latent_distillation_loss(ldm, p, x01, cond, t, torch.randn(bs, 4, 32, 32, device=device), cfg.distill_guidance)
        loss.backward()

    dist_s = timed(distill, 1, device)
    result["domainfusion"] = {
        "architecture": "SD-1.x VAE + UNet (random weights), 256 px, latents 4x32x32", "dtype": str(dtype), "batch": bs,
        "img2img": {"strength": cfg.strength, "ddim_steps": cfg.img2img_steps, "unet_calls": round(cfg.img2img_steps * cfg.strength),
                    "guidance": cfg.img2img_guidance, "batch_s": round(i2i, 3), "candidates_per_s": round(bs / i2i, 4)},
        "distillation": {"images_per_step": bs, "step_s": round(dist_s, 3), "steps_per_s": round(1 / dist_s, 4)},
    }
    if device.type == "cuda":
        result["domainfusion"]["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(f"DomainFusion, SD-1.x at 256 px ({dtype}): img2img {bs / i2i:.3f} candidates/s "
          f"({i2i:.2f}s for {bs}); latent distillation {1 / dist_s:.3f} steps/s ({dist_s:.2f}s a step of {bs} images)", flush=True)


# DomainNet's domain sizes (DomainBed's full DomainNet: 586,575 images)
DOMAINNET_SIZES = {"clipart": 48129, "infograph": 51605, "painting": 72266, "quickdraw": 172500, "real": 172947, "sketch": 69128}
OFFLINE_AUGMENTATION = 5_000_000  # images generated offline for DomainNet by the diffusion-based DG methods the paper compares to


def domainfusion_count_section(result):
    """7. Images the DomainNet sweep would generate (conf/experiment/domainfusion_domainnet.yaml over
    conf/method/domainfusion.yaml), against 5 million of offline augmentation."""
    method = OmegaConf.load(conf_dir() / "method" / "domainfusion.yaml")
    exp = OmegaConf.load(conf_dir() / "experiment" / "domainfusion_domainnet.yaml")
    frac = exp.method.get("synthetic_fraction", method.synthetic_fraction)
    rounds = (method.epochs - 1) // method.augment_every  # rounds start at epochs T, 2T, ... < epochs
    val = OmegaConf.load(conf_dir() / "dataset" / "domainnet.yaml").val_fraction
    per_target = {}
    for target in DOMAINNET_SIZES:
        n_train = sum(n - round(n * val) for d, n in DOMAINNET_SIZES.items() if d != target)
        synthetic = max(1, int(round(frac * n_train)))
        per_target[target] = {"source_train": n_train, "synthetic_set": synthetic, "candidates": rounds * synthetic * method.candidates}
    one_seed = sum(v["candidates"] for v in per_target.values())
    seeds = len(str(exp.hydra.sweeper.params.seed).split(","))
    result["domainfusion_domainnet_count"] = {
        "synthetic_fraction": frac, "rounds": rounds, "candidates_per_image": method.candidates, "per_target": per_target,
        "one_seed_all_targets": one_seed, "all_seeds": one_seed * seeds, "offline": OFFLINE_AUGMENTATION,
        "reduction_one_run_pct": round(100 * (1 - max(v["candidates"] for v in per_target.values()) / OFFLINE_AUGMENTATION), 2),
        "reduction_one_seed_pct": round(100 * (1 - one_seed / OFFLINE_AUGMENTATION), 2),
        "reduction_all_seeds_pct": round(100 * (1 - one_seed * seeds / OFFLINE_AUGMENTATION), 2),
    }
    print(f"DomainFusion DomainNet sweep: {rounds} rounds x {method.candidates} candidates x {frac:.3%} of the source images: "
          f"{max(v['candidates'] for v in per_target.values()):,} images per run at most, {one_seed:,} for the 6 held-out domains of one seed "
          f"({100 * one_seed / OFFLINE_AUGMENTATION:.1f}% of 5M: {result['domainfusion_domainnet_count']['reduction_one_seed_pct']}% fewer), "
          f"{one_seed * seeds:,} for {seeds} seeds", flush=True)


def shared_prefix_section(result, clip, names, device, args):
    """8. Prompts sharing their leading positions: all 77 positions vs truncated vs shared prefix."""
    domains, n_ctx, n_dom, w = ["art", "real world"], 16, 16, clip.text_width
    ctx = torch.nn.Parameter(torch.randn(n_ctx, w, device=device) * 0.02)
    dom = torch.nn.Parameter(torch.randn(len(domains), n_dom, w, device=device) * 0.02)
    placeholder = " ".join(["X"] * (n_ctx + n_dom))
    tokens = clip.tokenize([f"{placeholder} {c}, a {d} image." for d in domains for c in names])  # (G·C, 77)
    eot = clip.eot_positions(tokens)
    p, g, c = 1 + n_ctx + n_dom, len(domains), len(names)
    with torch.no_grad():
        emb = clip.token_embedding(tokens)
    sos, suffix = emb[0, :1], emb[:, p:].reshape(g, c, -1, w)  # suffix: all 77 - P positions
    weights = torch.randn(g * c, clip.embed_dim, device=device)

    def plain(truncate: bool) -> torch.Tensor:
        rows = torch.cat([sos.expand(g, c, 1, w), ctx.expand(g, c, n_ctx, w), dom[:, None].expand(g, c, n_dom, w), suffix], dim=2)
        return clip.encode_prompts(rows.reshape(g * c, -1, w), eot, truncate=truncate)  # (G·C, D)

    def shared() -> torch.Tensor:
        length = int(eot.max()) + 1 - p
        return clip.encode_grouped(PromptGroups.from_parts([sos, ctx, dom], [suffix[:, :, :length]], eot.view(g, c))).reshape(g * c, -1)

    def step(encode):
        ctx.grad = dom.grad = None
        (encode() * weights).sum().backward()

    with torch.no_grad():
        ref = plain(True)
        diff = {"full77": float((plain(False) - ref).abs().max()), "shared": float((shared() - ref).abs().max())}
    full_s = timed(lambda: step(lambda: plain(False)), max(1, args.repeats - 2), device)
    trunc_s = timed(lambda: step(lambda: plain(True)), args.repeats, device)
    shared_s = timed(lambda: step(shared), args.repeats, device)
    positions = int(eot.max()) + 1
    result["shared_prefix_dapl"] = {
        "classes": c, "domains": g, "prefix_positions": p, "positions_truncated": positions,
        "tokens_run": {"full77": g * c * clip.context_length, "truncated": g * c * positions, "shared": g * p + g * c * (positions - p)},
        "full77_s": round(full_s, 4), "truncated_s": round(trunc_s, 4), "shared_s": round(shared_s, 4),
        "speedup_vs_truncated": round(trunc_s / shared_s, 2), "speedup_vs_full77": round(full_s / shared_s, 2),
        "max_abs_feature_diff_vs_truncated": diff,
    }
    print(f"DAPL-shaped text fwd+bwd, {c} classes x {g} domains: 77 positions {full_s:.3f}s, truncated ({positions}) {trunc_s:.3f}s, "
          f"shared prefix ({p} once per domain) {shared_s:.3f}s -> {trunc_s / shared_s:.2f}x vs truncated, {full_s / shared_s:.2f}x vs 77; "
          f"max |feature diff| {diff}", flush=True)

    # PromptStyler: "a S style of a" and the N "a S style of a {class}", the style word inside the prefix
    cfg = OmegaConf.structured(PromptStylerConfig())
    dn = list(OmegaConf.load(conf_dir() / "dataset" / "domainnet.yaml").classes.values())
    ps = PromptStyler(cfg, clip, dn, device)
    style_text = cfg.style_template.format(PLACEHOLDER)
    groups = clip.group_texts([style_text] + [f"{style_text} {n}" for n in dn])  # the rows of StylePrompts
    at = ps.prompts.position  # the style word's position, inside the shared prefix
    assert at < groups.prefix_len, (at, groups.prefix_len)
    with torch.no_grad():
        content = clip.encode_text(dn)
        earlier = torch.nn.functional.normalize(torch.randn(cfg.n_styles // 2, clip.embed_dim, device=device), dim=-1)
    style = torch.nn.Parameter(torch.randn(w, device=device) * 0.02)
    opt = torch.optim.SGD([style], lr=cfg.style_lr, momentum=cfg.style_momentum)

    def encode_shared():
        pre = groups.prefix[0]
        f = clip.encode_grouped(PromptGroups.from_parts([pre[:at], style[None], pre[at + 1 :]], [groups.suffix], groups.eot))[0]
        return f[0], f[1:]

    def iteration(encode):
        f_style, f_sc = encode()
        loss = style_diversity_loss(f_style, earlier) + content_consistency_loss(f_sc, content)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        ps_diff = max(float((a - b).abs().max()) for a, b in zip(encode_shared(), ps.encode(style)))
    trunc_s = timed(lambda: iteration(lambda: ps.encode(style)), args.repeats, device)
    shared_s = timed(lambda: iteration(encode_shared), args.repeats, device)
    positions, p = int(ps.prompts.eot.max()) + 1, groups.prefix_len
    result["shared_prefix_promptstyler"] = {
        "classes": len(dn), "prefix_positions": p, "positions_truncated": positions,
        "tokens_run": {"truncated": (len(dn) + 1) * positions, "shared": p + (len(dn) + 1) * (positions - p)},
        "truncated_s": round(trunc_s, 4), "shared_s": round(shared_s, 4), "speedup": round(trunc_s / shared_s, 2),
        "max_abs_feature_diff": ps_diff,
    }
    print(f"PromptStyler iteration, N={len(dn)}: truncated ({positions} positions) {trunc_s:.3f}s, shared prefix ({p} once) "
          f"{shared_s:.3f}s -> {trunc_s / shared_s:.2f}x; max |feature diff| {ps_diff:.2e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
