"""GPU readiness check (``make gpu-check``, ``scripts/gpu_check.sh``): one command on a machine with
one GPU, a few minutes on an H100/H200, one JSON file, a non-zero exit on any error.

1. ``runs``: every method trains and evaluates on the demo world through the real CLI
   (``promptdg train ...`` in this process) on the device, with ``backbone.precision`` (bf16 by
   default) and short settings; each run's ``results.json`` must say ``finished`` and name the device
   and precision it ran with.
2. ``features``: feature-cache extraction images/s (DataLoader workers over a folder of generated
   224 px JPEGs, ViT-B/16 under the precision's autocast).
3. ``steps``: one training step of CoOp, DAPL, DAPT and a PromptStyler style iteration at 345
   classes, the official code's way and promptdg's (``benchmarks/bench_steps.py``: same loss checked), with
   CUDA peak memory.
4. ``domainfusion``: SD-1.x-size img2img candidates/s and latent-distillation steps/s at 256 px.

``--sizes real`` (default) times ViT-B/16 and SD-1.x sizes with random weights; ``--sizes tiny``
runs the same code on the demo CLIP, a handful of classes and the tests' tiny LDM sizes (the CPU
test, ``tests/test_gpu_check.py``, keeps this script from rotting). On the CPU, autocast and CUDA
memory figures are skipped (null), nothing else changes.

Usage: python scripts/gpu_check.py [--device cuda] [--precision bf16] [--sizes real|tiny]
       [--out gpu_check/gpu_check.json] [--work gpu_check/work] [--only runs,features,steps,domainfusion]
       [--methods zeroshot,linear_probe,coop,promptstyler,dapl,dapt,domainfusion] \
[--clip random|demo|FILE] [--ldm demo|DIR]
       [--per-class N] [--workers N] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

# bench_steps, bench_extra: the timings' code
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# isort: off
import promptdg_cli.backbone  # noqa: F401  (the torchvision shim before open_clip)
# isort: on
import open_clip
import torch
from safetensors.torch import save_file

from promptdg_cli.cli import main as cli_main

from bench_extra import domainfusion, feature_extraction
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

REPEATS = 3  # timed runs of each way and of the feature extraction (after an untimed warm-up); the median is kept
METHODS = ("zeroshot", "linear_probe", "coop", "promptstyler", "dapl", "dapt", "domainfusion")
PARTS = ("runs", "features", "steps", "domainfusion")
# short settings of each method on the demo world (one held-out domain; PromptStyler trains once)
SHORT = {
    "zeroshot": ["target=photo"],
    "linear_probe": ["target=photo", "method.c_min=0.01", "method.c_max=100", "method.refine_steps=2"],
    "coop": ["target=photo", "method.epochs=2"],
    "promptstyler": ["method.n_styles=4", "method.style_iters=10", "method.epochs=2"],
    "dapl": ["source=[printed]", "target=photo", "method.epochs=2"],
    "dapt": ["target=photo", "shots=4", "method.epochs=2"],
    "domainfusion": [
        "target=photo",
        "method.steps=3",
        "method.checkpoint_freq=2",
        "method.augment_every=1",
        "method.candidates=2",
        "method.img2img_steps=4",
        "method.synthetic_fraction=0.25",
    ],
}
# sizes of the timings: real (ViT-B/16, Office-Home's 65 / DomainNet's 345 classes, SD-1.x) or tiny
SIZES = {
    "real": {"model": "ViT-B-16-quickgelu", "classes": None, "ps_classes": None, "batch": 32, "style": 40,
             "feature_images": 2048, "df": "real", "df_batch": 4},
    "tiny": {"model": "demo-clip-vit", "classes": 6, "ps_classes": 8, "batch": 4, "style": 3,
             "feature_images": 16, "df": "tiny", "df_batch": 2},
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=("fp32", "bf16", "fp16"),
        help="backbone.precision of the runs and timings",
    )
    ap.add_argument("--sizes", default="real", choices=tuple(SIZES))
    ap.add_argument("--out", default="gpu_check/gpu_check.json")
    ap.add_argument("--work", default=None, help="run outputs and caches (default: <out's folder>/work)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--clip",
        default="random",
        help="demo CLIP weights: random (built here), demo (pretrained on first use) or a file",
    )
    ap.add_argument("--ldm", default="demo", help="DomainFusion's method.ldm: demo (built on first use) or a folder")
    ap.add_argument(
        "--per-class", type=int, default=None, help="demo world images per class and domain (default: the dataset's)"
    )
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads while the check runs (0: torch's default)"
    )
    args = ap.parse_args(argv)
    for name, value, valid in (("--only", args.only, PARTS), ("--methods", args.methods, METHODS)):
        bad = [v for v in value.split(",") if v and v not in valid]
        if bad:
            ap.error(f"{name} {','.join(bad)}: not valid. Valid: {', '.join(valid)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible here (torch {torch.__version__}, "
                 f"CUDA build {torch.version.cuda}). Valid here: --device cpu (with --sizes tiny for a quick check)")
    return args


def random_clip(folder: Path) -> Path:
    """A demo-clip-vit checkpoint with random weights (the plumbing needs no trained model)."""
    path = folder / "random-demo-clip.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model("demo-clip-vit")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def check_run(method: str, args, work: Path, common: list) -> dict:
    """``promptdg train method=<method> <short settings>``; its record must say finished, on the
    device and at the precision asked for."""
    out_root = work / "outputs" / method
    extra = SHORT[method] + ([f"method.ldm={args.ldm}"] if method == "domainfusion" else [])
    argv = ["train", f"method={method}", *common, f"out_root={out_root}", *extra]
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(args.device))  # the record's CUDA peak: this run's
    t = time.perf_counter()
    try:
        code = cli_main(argv)
    except SystemExit as e:  # a user error (bad weights path, config) outside a sweep exits with its code
        code = e.code if isinstance(e.code, int) else 1
    wall = time.perf_counter() - t
    records = sorted(out_root.rglob("results.json"))
    if code != 0 or len(records) != 1:
        raise RuntimeError(f"promptdg {' '.join(argv)}: exit code {code}, {len(records)} results.json")
    rec = json.loads(records[0].read_text())
    want = {"status": "finished", "device": str(torch.device(args.device)), "precision": args.precision}
    wrong = {k: rec.get(k) for k, v in want.items() if rec.get(k) != v}
    if wrong:
        raise RuntimeError(
            f"{records[0]}: {wrong}, expected {want}" + (f"; error: {rec.get('error')}" if rec.get("error") else "")
        )
    print(
        f"[gpu-check] {method}: finished on {rec['device']} ({rec['precision']}) in {wall:.1f} s, "
        f"avg top-1 {rec['avg_accuracy']:.1f}",
        flush=True,
    )
    return {
        "argv": argv,
        "wall_s": round(wall, 2),
        "status": rec["status"],
        "device": rec["device"],
        "precision": rec["precision"],
        "avg_accuracy": rec["avg_accuracy"],
        "accuracy": rec["accuracy"],
        "timings": rec["timings"],
        "peak_memory_mb": rec["peak_memory_mb"],
        "record": str(records[0]),
    }


def main(argv=None) -> int:
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return check(args)
    finally:
        torch.set_num_threads(threads)


def check(args) -> int:
    device, size = torch.device(args.device), SIZES[args.sizes]
    out = Path(args.out)
    work = Path(args.work or out.parent / "work")
    shutil.rmtree(work / "outputs", ignore_errors=True)  # every run trains afresh (a finished run would be skipped)
    shutil.rmtree(work / "cache" / "features", ignore_errors=True)  # and extracts its features afresh
    t0 = time.time()
    result = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": args.precision,
        "sizes": args.sizes,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "runs": {},
        "timings": {},
        "errors": [],
    }
    parts = [p for p in args.only.split(",") if p]

    def attempt(where: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (every failure is recorded; the exit code says there was one)
            print(f"[gpu-check] {where} FAILED: {type(e).__name__}: {e}", flush=True)
            result["errors"].append(
                {"where": where, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            )
            return None

    if "runs" in parts:
        common = [f"device={args.device}", f"backbone.precision={args.precision}", f"cache_root={work / 'cache'}",
                  f"num_workers={args.workers}", "seed=1"]
        if args.clip != "demo":
            clip_file = random_clip(work / "weights") if args.clip == "random" else Path(args.clip)
            common += ["backbone.builder=null", f"backbone.pretrained={clip_file}"]
        if args.per_class:
            common.append(f"dataset.generator_args.per_class={args.per_class}")
        for method in [m for m in args.methods.split(",") if m]:
            result["runs"][method] = attempt(f"run {method}", lambda m=method: check_run(m, args, work, common))
    if any(p in parts for p in ("features", "steps", "domainfusion")):
        clip = build_clip(size["model"], device, args.precision)
        # both ways measured alike: an untimed warm-up in the timed precision, then the median of
        # REPEATS synchronised runs
        b = Bench(
            clip,
            device,
            repeats=REPEATS,
            repeats_official=REPEATS,
            warmup=True,
            precision=args.precision,
            image_size=image_size(clip),
        )
        result["repeats"] = {
            "official": REPEATS,
            "promptdg": REPEATS,
            "warmup_runs": 1,
            "statistic": "median",
            "timed_precision": args.precision if device.type == "cuda" else "fp32 (no autocast on the CPU)",
        }
        timings = result["timings"]
        if "features" in parts:
            timings["feature_extraction"] = attempt("features", lambda: feature_extraction(
                b, size["feature_images"], args.workers if args.sizes == "real" else 0, folder=work / "feature_images"))
        if "steps" in parts:
            oh, dn = classnames("officehome")[: size["classes"]], classnames("domainnet")[: size["ps_classes"]]
            bs = size["batch"]
            for key, fn in (("coop_step", lambda: coop_step(b, oh, bs)), ("dapl_step", lambda: dapl_step(b, oh, bs)),
                            ("dapt_step", lambda: dapt_step(b, oh, bs)),
                            ("promptstyler_iteration", lambda: promptstyler_iteration(b, dn, size["style"]))):
                timings[key] = attempt(key, fn)
                if timings[key] is not None and not timings[key]["check"]["equal"]:
                    result["errors"].append({"where": key, "error": f"the two ways differ: {timings[key]['check']}"})
        if "domainfusion" in parts:
            timings["domainfusion"] = attempt("domainfusion", lambda: domainfusion(b, size["df_batch"], size["df"]))
    result["total_s"] = round(time.time() - t0, 1)
    result["ok"] = not result["errors"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(
        f"[gpu-check] {'OK' if result['ok'] else 'FAILED'}: {len(result['errors'])} error(s), "
        f"{result['total_s']:.0f} s; wrote {out}",
        flush=True,
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
