"""The bench's other sections: feature extraction throughput, DomainFusion's LDM work and the projected
training times of the papers' schedules (``benchmarks/bench.py``, ``scripts/gpu_check.py``; the
markdown tables are ``bench_tables.py``'s)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from promptdg_cli.config import conf_dir
from promptdg_cli.data import FeatureCache

from bench_steps import Bench, method_config

# --------------------------------------------------------------------- schedules of the papers
OFFICEHOME_SIZES = {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357}
PAPER_TIME = {  # the papers' own wall-time figures (None: the paper gives none)
    "promptstyler": "about 30 min for the whole training on one GPU (paper)",
    "dapl": None,
    "coop": None,
    "dapt": None,
}


def project(result: dict, b: Bench, shots: int = 16) -> None:
    """Projected wall time of each paper's full training from the measured steps (hours), next to the
    paper's figure, in the official protocol (CoOp, DAPL: every step's images encoded afresh, as a
    fresh view per epoch costs; ``promptdg_cheaper_h``: the cached features, each image encoded once)."""
    def hours(s):
        return round(s / 3600, 3)

    per_image = b.encode_s(32) / 32 if any(k in result for k in ("coop_step", "dapl_step", "dapt_step")) else 0.0
    if "promptstyler_iteration" in result:
        r = result["promptstyler_iteration"]
        n = r["styles_K"] * r["iterations_L"]
        r["projected_training"] = {
            "schedule": f"stage 1: K={r['styles_K']} styles x L={r['iterations_L']} iterations at N={r['classes']} "
                        f"(measured at style {r['style_index']}, the average cost over the K styles)",
            "steps": n, "official_h": hours(n * r["official_s"]), "promptdg_h": hours(n * r["promptdg_s"]),
            "paper": PAPER_TIME["promptstyler"]}
    if "dapl_step" in result:
        r = result["dapl_step"]
        epochs = int(method_config("dapl", "officehome").epochs)
        steps = epochs * float(np.mean([n // r["source_batch"] for n in OFFICEHOME_SIZES.values()]))
        images = float(
            np.mean(
                [
                    OFFICEHOME_SIZES[s] + OFFICEHOME_SIZES[t]
                    for s in OFFICEHOME_SIZES
                    for t in OFFICEHOME_SIZES
                    if s != t
                ]
            )
        )
        r["projected_training"] = {
            "schedule": f"Office-Home, one source->target pair (mean of the 12): {epochs} epochs x "
            f"floor(source images / {r['source_batch']}) steps (the official loop counts source batches)",
            "steps": round(steps, 1),
            "official_h": hours(steps * r["official_s"]),
            "promptdg_h": hours(steps * r.get("promptdg_augmented_s", r["promptdg_s"]) + r["promptdg_setup_s"]),
            "promptdg_cheaper_h": hours(steps * r["promptdg_s"] + images * per_image + r["promptdg_setup_s"]),
            "paper": PAPER_TIME["dapl"],
        }
    for key, name, choice in (("coop_step", "coop", "coop"), ("dapt_step", "dapt", "dapt")):
        if key not in result:
            continue
        r = result[key]
        epochs = 200  # the official 16-shot schedules (CoOp: configs/trainers/CoOp/*_ep200; DAPT: scripts/main.sh)
        images = shots * r["classes"]
        steps = epochs * (images // r["batch"])
        one_time = images * per_image  # CoOp: the features; DAPT: the prototypes
        r["projected_training"] = {
            "schedule": f"{shots} shots x {r['classes']} classes, {epochs} epochs x {images // r['batch']} steps",
            "steps": steps, "official_h": hours(steps * r["official_s"]),
            "promptdg_h": hours(steps * r.get("promptdg_augmented_s", r["promptdg_s"]) + one_time),
            "promptdg_one_time_s": round(one_time, 1), "paper": PAPER_TIME[name]}
        if "promptdg_augmented_s" in r:  # CoOp: the cheaper protocol encodes each image once
            r["projected_training"]["promptdg_cheaper_h"] = hours(steps * r["promptdg_s"] + one_time)


# --------------------------------------------------------------------- feature extraction
def write_images(folder: Path, n: int, size: int = 224, seed: int = 0) -> List[Path]:
    """``n`` JPEG images of ``size`` px (smooth colour fields plus noise: they decode like photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        a = rng.uniform(0, 1, (3, 3))
        img = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] for c in range(3)], -1) * 127
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        p = folder / f"img_{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def feature_extraction(b: Bench, n: int, workers: int, batch_size: int = 128, folder: Optional[Path] = None) -> dict:
    """Images per second of the feature cache's extraction (``FeatureCache._encode``: DataLoader
    workers decode and preprocess, the frozen image encoder under the backbone's precision). An
    untimed extraction of the same images first (kernels, cuDNN and cuBLAS set-up at the timed batch
    shape, the files in the page cache), then the median of ``b.repeats`` extractions, each starting
    its workers as a real extraction does."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(folder or tmp)
        t = time.perf_counter()
        paths = write_images(root / "images", n)
        write_s = time.perf_counter() - t
        batch_size = loader_batch(n, batch_size)
        cache = FeatureCache(root / "cache", batch_size=batch_size, num_workers=workers)
        _, x = cache._encode(b.clip, paths, "warm-up")
        b.reset_peak()
        reps = max(b.repeats, 1)
        s = b.timed(lambda: cache._encode(b.clip, paths, "bench images"), reps)
    out = {
        "images": n,
        "size": 224,
        "batch": batch_size,
        "workers": workers,
        "precision": b.clip.precision,
        "write_jpeg_s": round(write_s, 2),
        "encode_s": round(s, 3),
        "images_per_s": round(n / s, 1),
        "timed_runs": reps,
        "warmup_runs": 1,
        "worker_start_included": workers > 0,
        "features": list(x.shape),
        "cuda_peak_mb": b.peak_mb(),
    }
    print(
        f"feature extraction: {n} JPEGs of 224 px, {workers} workers, {b.clip.precision}: {n / s:.1f} images/s",
        flush=True,
    )
    return out


def loader_batch(n: int, batch_size: int) -> int:
    """The batch size of a throughput measurement over ``n`` images: at most ``batch_size``, and small
    enough for more than 4 batches (``data.image_batches`` loads 4 batches or fewer in the main process,
    without its workers)."""
    return max(1, min(batch_size, (n - 1) // 4))


def loader_throughput(b: Bench, n: int, worker_counts: Sequence[tuple], batch_size: int = 128) -> dict:
    """Images per second of the image loader alone (``data.image_batches``: JPEG decoding and CLIP's
    preprocessing in DataLoader workers, batches copied to the device) and of the loader with the frozen
    image encoder behind it (``FeatureCache._encode``), for each ``(label, workers)`` of ``worker_counts``
    (the count ``num_workers=auto`` chooses on this machine, and 2, the default before it). An untimed
    pass first, then the median of ``b.repeats`` passes, each starting its workers as a run does."""
    from promptdg_cli.data import image_batches

    def load_only(paths, workers):
        for _, x, _ in image_batches(paths, b.clip.preprocess, batch_size, workers, device=b.device):
            x.to(b.device, non_blocking=True)

    rows = []
    batch_size = loader_batch(n, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root / "images", n)
        for label, workers in worker_counts:
            cache = FeatureCache(root / f"cache{workers}", batch_size=batch_size, num_workers=workers)
            row = {"num_workers": workers, "chosen_by": label}
            for key, fn in (
                ("loader", lambda: load_only(paths, workers)),
                ("loader_and_encoder", lambda: cache._encode(b.clip, paths, "bench")),
            ):
                fn()  # (untimed: kernels, files in the page cache)
                row[f"{key}_images_per_s"] = round(n / b.timed(fn, max(b.repeats, 1)), 1)
            rows.append(row)
            print(f"loader: {workers} workers ({label}): {row['loader_images_per_s']} images/s alone, "
                  f"{row['loader_and_encoder_images_per_s']} with the {b.clip.precision} encoder", flush=True)
    return {
        "images": n,
        "size": 224,
        "batch": batch_size,
        "precision": b.clip.precision,
        "timed_runs": max(b.repeats, 1),
        "rows": rows,
    }


# --------------------------------------------------------------------- DomainFusion
def sd_architecture(size: str, device: torch.device, dtype: torch.dtype):
    """Stable Diffusion 1.x's VAE and UNet with random weights (``real``: 256 px, latents 4x32x32), or
    the tests' tiny LDM (``tiny``: 32 px, latents 4x8x8); returns (vae, unet, scheduler, text width, px)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if size == "real":
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=256,
        )
        unet, width, px = UNet2DConditionModel(sample_size=32, cross_attention_dim=768), 768, 256
    else:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=128,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        width, px = 128, 32
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return vae.to(device, dtype), unet.to(device, dtype), sched, width, px


def domainfusion(b: Bench, batch: int, size: str = "real") -> dict:
    """img2img candidates per second (the config's strength, DDIM steps and guidance) and latent-
    distillation steps per second (VAE encoder forward + backward, one guided UNet call), in the
    dtype a run uses (``ldm_dtype: auto``: fp16 on a GPU)."""
    from promptdg_cli.ldm import LatentDiffusion, resolve_dtype
    from promptdg_cli.methods.domainfusion import latent_distillation_loss

    cfg, dev = method_config("domainfusion"), b.device
    dtype = resolve_dtype(str(cfg.ldm_dtype), dev)
    vae, unet, sched, width, px = sd_architecture(size, dev, dtype)
    ldm = LatentDiffusion(
        vae, unet, sched, lambda prompts: torch.randn(len(prompts), 77, width), f"sd1-{size}-random", dtype
    )
    x01 = torch.rand(batch, 3, px, px, device=dev)
    prompts = [f"a photo of a class{i}" for i in range(batch)]
    g = torch.Generator(device=dev).manual_seed(0)
    b.reset_peak()
    run_i2i = lambda: ldm.img2img(x01 * 2 - 1, prompts, cfg.strength, cfg.img2img_steps, cfg.img2img_guidance, g)  # noqa: E731
    run_i2i()
    i2i = b.timed(run_i2i, 1)
    head = torch.nn.Linear(16, 10).to(dev)
    feats, cond = torch.randn(batch, 16, device=dev), ldm.encode_text(prompts)
    lat = px // (2 ** (len(vae.config.block_out_channels) - 1))

    def distill():
        p = head(feats).softmax(-1)[:, 0]
        t = torch.randint(20, 980, (batch,), device=dev)
        loss, _ = latent_distillation_loss(
            ldm, p, x01, cond, t, torch.randn(batch, 4, lat, lat, device=dev), cfg.distill_guidance
        )
        loss.backward()

    distill()
    dist_s = b.timed(distill, 1)
    out = {
        "architecture": f"SD-1.x VAE + UNet (random weights), {px} px, latents 4x{lat}x{lat}"
        if size == "real"
        else f"tiny LDM, {px} px",
        "dtype": str(dtype),
        "batch": batch,
        "img2img": {
            "strength": cfg.strength,
            "ddim_steps": cfg.img2img_steps,
            "unet_calls": round(cfg.img2img_steps * cfg.strength),
            "guidance": cfg.img2img_guidance,
            "batch_s": round(i2i, 3),
            "candidates_per_s": round(batch / i2i, 4),
        },
        "distillation": {"images_per_step": batch, "step_s": round(dist_s, 3), "steps_per_s": round(1 / dist_s, 4)},
        "cuda_peak_mb": b.peak_mb(),
    }
    print(f"DomainFusion ({out['architecture']}, {dtype}): img2img {batch / i2i:.3f} candidates/s; "
          f"latent distillation {1 / dist_s:.3f} steps/s ({batch} images a step)", flush=True)
    return out


# DomainNet's domain sizes (DomainBed's full DomainNet: 586,575 images)
DOMAINNET_SIZES = {
    "clipart": 48129,
    "infograph": 51605,
    "painting": 72266,
    "quickdraw": 172500,
    "real": 172947,
    "sketch": 69128,
}
# images generated offline for DomainNet by the diffusion-based DG methods the paper compares to
OFFLINE_AUGMENTATION = 5_000_000


def domainfusion_count() -> dict:
    """Images the DomainNet sweep would generate (conf/experiment/domainfusion_domainnet.yaml, the method
    composed as ``promptdg train method=domainfusion dataset=domainnet``: its synthetic set and rounds
    are conf/dataset/domainnet.yaml's), against 5 million of offline augmentation."""
    from promptdg_cli.domainbed import checkpoint_rounds

    method = method_config("domainfusion", "domainnet")
    exp = OmegaConf.load(conf_dir() / "experiment" / "domainfusion_domainnet.yaml")
    frac = float(method.synthetic_fraction)
    periods = len(checkpoint_rounds(int(method.steps), int(method.checkpoint_freq)))
    rounds = len([p for p in range(1, periods) if p % int(method.augment_every) == 0])  # before periods T, 2T, ...
    val = OmegaConf.load(conf_dir() / "dataset" / "domainnet.yaml").val_fraction
    per_target = {}
    for target in DOMAINNET_SIZES:
        n_train = sum(n - int(n * val) for d, n in DOMAINNET_SIZES.items() if d != target)  # DomainBed's "in" parts
        synthetic = max(1, int(round(frac * n_train)))
        per_target[target] = {
            "source_train": n_train,
            "synthetic_set": synthetic,
            "candidates": rounds * synthetic * method.candidates,
        }
    one_seed = sum(v["candidates"] for v in per_target.values())
    seeds = len(str(exp.hydra.sweeper.params.seed).split(","))
    out = {
        "synthetic_fraction": frac,
        "rounds": rounds,
        "candidates_per_image": method.candidates,
        "per_target": per_target,
        "one_seed_all_targets": one_seed,
        "all_seeds": one_seed * seeds,
        "offline": OFFLINE_AUGMENTATION,
        "reduction_one_run_pct": round(
            100 * (1 - max(v["candidates"] for v in per_target.values()) / OFFLINE_AUGMENTATION), 2
        ),
        "reduction_one_seed_pct": round(100 * (1 - one_seed / OFFLINE_AUGMENTATION), 2),
        "reduction_all_seeds_pct": round(100 * (1 - one_seed * seeds / OFFLINE_AUGMENTATION), 2),
    }
    print(
        f"DomainFusion DomainNet sweep: {max(v['candidates'] for v in per_target.values()):,} images per run at most, "
        f"{one_seed:,} for the 6 held-out domains of one seed ({out['reduction_one_seed_pct']}% fewer than 5M)",
        flush=True,
    )
    return out
