"""The benchmark's markdown tables, from one result of ``benchmarks/bench.py`` (the dict it writes as
JSON). No torch here: ``tools/render_docs.py`` renders docs/speed.md from the committed JSON files
without loading a model, and ``bench.py`` prints the same tables at the end of a run."""
from __future__ import annotations

from typing import List

# --------------------------------------------------------------------- tables
STEP_ROWS = (
    ("coop_step", "CoOp step"),
    ("dapl_step", "DAPL step"),
    ("dapt_step", "DAPT step"),
    ("promptstyler_iteration", "PromptStyler style iteration"),
    ("erm_step", "ERM step (vs DomainBed's ERM.update)"),
    ("domainfusion_step", "DomainFusion step (vs a plain implementation)"),
)


def markdown_tables(result: dict) -> str:
    """Each step both ways, then the projected trainings."""
    lines = [
        "| method | official way s | promptdg s, official protocol | speedup "
        "| promptdg s, cheaper protocol (augment=none) | speedup | equal check |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, label in STEP_ROWS:
        if key in result:
            r, c = result[key], result[key]["check"]
            ok = "yes" if c["equal"] else "**no**"
            if "promptdg_augmented_s" in r:  # a frozen-encoder method: a fresh view per epoch, or cached features
                aug = f"{r['promptdg_augmented_s']:.3f} | **{r['speedup_augmented']:.1f}x**"
                if "speedup_augmented_sweep" in r:
                    aug += (
                        f" ({r['speedup_augmented_sweep']:.1f}x with views shared by {r['view_share']} runs of a sweep)"
                    )
                cheap = f"{r['promptdg_s']:.3f} | {r['speedup']:.1f}x"
            else:  # (DAPT, PromptStyler: the same protocol both ways)
                aug, cheap = f"{r['promptdg_s']:.3f} | **{r['speedup']:.1f}x**", "same | same"
            lines.append(
                f"| {label} | {r['official_s']:.2f} | {aug} | {cheap} | {ok}: loss "
                f"{c['loss_official']:.5f} vs {c['loss_promptdg']:.5f}, max grad diff {c['grad_max_abs_diff']:.1e} "
                f"(max grad {c['grad_max_abs']:.1e}) |"
            )
    rows = [
        (label, result[key]["projected_training"])
        for key, label in STEP_ROWS
        if "projected_training" in result.get(key, {})
    ]
    if rows:
        lines += ["", "| training | schedule | official way h | promptdg h | paper |", "|---|---|---:|---:|---|"]
        for label, p in rows:
            lines.append(
                f"| {label.split()[0]} | {p['schedule']} | {p['official_h']:.2f} | {p['promptdg_h']:.2f} "
                f"| {p['paper'] or 'not given'} |"
            )
    return "\n".join(lines)


def machine(result: dict) -> str:
    """Where and how the numbers were measured, in one sentence (results written before ``bench.py``
    recorded the CPU's name leave it out)."""
    where = result.get("gpu") or result.get("cpu") or "an unnamed CPU"
    if result.get("cpu_capability") and not result.get("gpu"):
        where += f" ({result['cpu_capability']} kernels)"
    if result.get("cores") and not result.get("gpu"):
        where += f", {result['cores']} cores"
    official = result.get("repeats_official")
    official = f"the median of {official} timed runs" if official else "the time of its checked run"
    total = result["total_s"]
    took = f"{total / 60:.0f} min" if total >= 120 else f"{total:.0f} s"
    threads = f"{result['threads']} torch thread" + ("s" if result["threads"] != 1 else "")
    return (
        f"Measured on {where}: device `{result['device']}`, {threads}, torch {result['torch']}, "
        f"`{result['model']}` with {result['weights']} weights, {result['precision']}. promptdg's step time is the "
        f"median of {result['repeats']} timed run(s), the official way's {official}; the whole benchmark took {took}."
    )


def other_tables(result: dict) -> str:
    """Feature extraction, DomainFusion's LDM work and its DomainNet image count, where measured."""
    lines: List[str] = []
    if "feature_extraction" in result:
        f = result["feature_extraction"]
        lines += [
            f"Feature-cache extraction: **{f['images_per_s']:.1f} images/s** ({f['images']} JPEGs of {f['size']} px, "
            f"batch {f['batch']}, {f['workers']} DataLoader workers, {f['precision']}).",
            "",
        ]
    if "loader" in result:
        d = result["loader"]
        lines += [
            f"Image loading ({d['images']} JPEGs of {d['size']} px, batch {d['batch']}, "
            f"median of {d['timed_runs']} passes; each pass starts its workers, as a run does):",
            "",
            "| DataLoader workers | chosen by | loader alone (images/s) | loader + image encoder (images/s) |",
            "|---:|---|---:|---:|",
        ]
        lines += [
            f"| {r['num_workers']} | {r['chosen_by']} | {r['loader_images_per_s']:.1f} "
            f"| {r['loader_and_encoder_images_per_s']:.1f} |"
            for r in d["rows"]
        ] + [""]
    if "domainfusion" in result:
        d = result["domainfusion"]
        i, s = d["img2img"], d["distillation"]
        lines += [
            f"DomainFusion's LDM work ({d['architecture']}, {d['dtype']}):",
            "",
            "| work | batch | s per batch | rate |",
            "|---|---:|---:|---:|",
            f"| img2img candidates (strength {i['strength']}, {i['ddim_steps']} DDIM steps, "
            f"guidance {i['guidance']}) | {d['batch']} | {i['batch_s']:.3f} | "
            f"{i['candidates_per_s']:.3f} candidates/s |",
            f"| latent distillation (VAE encoder forward + backward, one guided UNet call) | {s['images_per_step']} | "
            f"{s['step_s']:.3f} | {s['steps_per_s']:.3f} steps/s |",
            "",
        ]
    if "domainfusion_domainnet_count" in result:
        c = result["domainfusion_domainnet_count"]
        per_run = max(v["candidates"] for v in c["per_target"].values())
        lines += [
            f"DomainFusion's DomainNet sweep generates at most {per_run:,} images per run and "
            f"{c['one_seed_all_targets']:,} for the six held-out domains of one seed ({c['all_seeds']:,} over all "
            f"seeds), against {c['offline']:,} images of offline augmentation "
            f"({c['reduction_one_seed_pct']} % fewer per seed).",
            "",
        ]
    return "\n".join(lines).rstrip()
