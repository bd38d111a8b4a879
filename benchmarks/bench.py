"""promptdg benchmark (``make bench``): each method's training step the official code's way and
promptdg's way, in one run, on one machine, with one model (ViT-B/16, random weights, real sizes).

Sections (``--only`` picks some; the step functions are in ``bench_steps.py``, the rest in
``bench_extra.py``):

* ``coop``, ``dapl``, ``dapt``, ``promptstyler``: one training step (PromptStyler: one style
  iteration at DomainNet's 345 classes) both ways, the check that both give the same loss and
  gradients, the speedup, and the projected wall time of each paper's full training (stored under
  ``<method>_step`` / ``promptstyler_iteration``);
* ``features``: feature-cache extraction throughput over a folder of generated 224 px JPEGs;
* ``loader``: images/s of the image loader alone and with the image encoder behind it, with the
  worker count ``num_workers=auto`` chooses on the machine and with 2;
* ``domainfusion``: SD-1.x-size img2img candidates/s and latent-distillation steps/s at 256 px;
* ``domainfusion_count``: the images DomainFusion's DomainNet sweep generates vs 5M offline;
* ``erm``, ``domainfusion_step`` (``bench_domainbed.py``): one step of DomainBed's ERM and of DomainFusion
  on the ResNet-50 (random weights) against DomainBed's ``ERM.update`` written out and a plain
  implementation of the DomainFusion step (SD v1.5's UNet and VAE at 512 px), checked equal and timed.

Each step's check runs in fp32; its timings in ``--precision`` (autocast on CUDA). Wall time and
this process's CPU time are both stored (``speedup``, ``speedup_cpu_time``): on a shared CPU the
latter is the steadier. On the CPU, torch runs one thread by default (``--threads``) and the official
way's step, a minute or more there, is timed on its checked run. The markdown tables
(``bench_tables.py``) are printed at the end and stored as ``markdown``; ``tools/render_docs.py``
renders docs/speed.md from the JSON files in benchmarks/results/.

The result also names the machine (``environment.hardware``: the CPU's model and torch's CPU kernel
level, the GPU) and its core count, which docs/speed.md prints above each machine's tables.

Usage: python benchmarks/bench.py [--out benchmarks/results/cpu.json] [--device cpu|cuda] [--precision fp32|bf16]
       [--repeats 3] [--repeats-official N] [--threads 1] [--breakdown]
       [--only coop,dapl,dapt,promptstyler,features,loader,domainfusion,domainfusion_count,erm,domainfusion_step]
       [--erm-batch 32] [--df-step-batch 32] [--df-distilled 8] [--df-px 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from promptdg_cli.devices import loader_workers
from promptdg_cli.environment import hardware

from bench_domainbed import domainfusion_step, erm_step
from bench_extra import domainfusion, domainfusion_count, feature_extraction, loader_throughput, project
from bench_steps import (
    Bench,
    build_clip,
    classnames,
    coop_step,
    dapl_step,
    dapt_step,
    image_size,
    promptstyler_iteration,
)
from bench_tables import markdown_tables

SECTIONS = (
    "coop",
    "dapl",
    "dapt",
    "promptstyler",
    "features",
    "loader",
    "domainfusion",
    "domainfusion_count",
    "erm",
    "domainfusion_step",
)
HEAVY = ("domainfusion", "domainfusion_step")  # SD-1.x-size UNets: many minutes on a CPU (--only runs them there)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/cpu.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast of both ways on CUDA"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of promptdg's step after its checked (warm-up) run; the median is kept",
    )
    ap.add_argument(
        "--repeats-official",
        type=int,
        default=None,
        help="timed runs of the official way's step; 0: the checked run's time (default: 0 on the CPU, where a step "
        "takes minutes, else --repeats)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). One by default: on a shared CPU, torch's threads wait on each "
        "other at every operation, which penalises the way with many small operations",
    )
    ap.add_argument("--model", default="ViT-B-16-quickgelu")
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all; on the CPU "
        f"all but {', '.join(HEAVY)}, whose SD-1.x-size UNets take many minutes there)",
    )
    ap.add_argument("--breakdown", action="store_true", help="also time promptdg's way without prefix sharing")
    ap.add_argument("--batch", type=int, default=32, help="images per step (the official batch size)")
    ap.add_argument(
        "--feature-images", type=int, default=None, help="images of the features section (default: 64 CPU, 2048 GPU)"
    )
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the features section")
    ap.add_argument("--df-batch", type=int, default=4, help="images per DomainFusion img2img / distillation batch")
    ap.add_argument(
        "--erm-batch",
        type=int,
        default=32,
        help="images of each of the 3 source domains in the ERM step (DomainBed's 32)",
    )
    ap.add_argument("--df-step-batch", type=int, default=32, help="images of each minibatch of the DomainFusion step")
    ap.add_argument("--df-distilled", type=int, default=8, help="distilled images of the DomainFusion step")
    ap.add_argument(
        "--df-px", type=int, default=512, help="the LDM's resolution in the DomainFusion step (SD v1.5's 512)"
    )
    args = ap.parse_args(argv)
    cpu = not args.device.startswith("cuda")
    only = [s for s in (args.only or ",".join(s for s in SECTIONS if not (cpu and s in HEAVY))).split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"--only {','.join(bad)}: no such section. Valid: {', '.join(SECTIONS)}")
    return args, only


def main(argv=None) -> int:
    args, only = parse(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    clip = build_clip(args.model, device, args.precision)
    reps_official = (
        args.repeats_official if args.repeats_official is not None else (0 if device.type == "cpu" else args.repeats)
    )
    b = Bench(clip, device, repeats=args.repeats, repeats_official=reps_official, precision=args.precision,
              breakdown=args.breakdown, image_size=image_size(clip))
    result = {
        "model": args.model,
        "weights": "random",
        "device": str(device),
        "precision": args.precision,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        **hardware(device),
        "host": platform.node(),
        "repeats": args.repeats,
        "repeats_official": reps_official,
    }
    officehome, domainnet = classnames("officehome"), classnames("domainnet")
    if "coop" in only:
        result["coop_step"] = coop_step(b, officehome, args.batch)
    if "dapl" in only:
        result["dapl_step"] = dapl_step(b, officehome, args.batch)
    if "dapt" in only:
        result["dapt_step"] = dapt_step(b, officehome, args.batch)
    if "promptstyler" in only:
        result["promptstyler_iteration"] = promptstyler_iteration(b, domainnet)
    project(result, b)
    if "features" in only:
        n = args.feature_images or (2048 if device.type == "cuda" else 64)
        result["feature_extraction"] = feature_extraction(b, n, args.workers)
    if "loader" in only:
        auto = loader_workers("auto")
        counts = [(auto[1], auto[0])] + ([("the default before num_workers=auto", 2)] if auto[0] != 2 else [])
        result["loader"] = loader_throughput(b, args.feature_images or (2048 if device.type == "cuda" else 64), counts)
    if "domainfusion" in only:
        result["domainfusion"] = domainfusion(b, args.df_batch)
    if "domainfusion_count" in only:
        result["domainfusion_domainnet_count"] = domainfusion_count()
    if "erm" in only:
        result["erm_step"] = erm_step(b, args.erm_batch)
    if "domainfusion_step" in only:
        result["domainfusion_step"] = domainfusion_step(b, args.df_step_batch, args.df_distilled, px=args.df_px)
    result["image_encoder_batch_s"] = b._encode_s
    result["total_s"] = round(time.time() - t0, 1)
    result["markdown"] = markdown_tables(result)
    print("\n" + result["markdown"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
