#!/usr/bin/env python3
"""The claims table (``make claims``): each paper's central comparison, rerun on the demo world.

Every claim is a comparison of two *arms*: a baseline and the method, each one ``promptdg train -m``
sweep over the seeds with the method YAML's defaults (the paper's values), run into
``<out>/<arm>/``. A rerun reuses the finished runs (promptdg skips a run whose config hash has a
finished record). The script then reads every arm's ``results.json`` records and prints one row per
comparison: the claim, the paper's table, the baseline's and the method's mean ± sample std over the
seeds of the runs' ``avg_accuracy`` (top-1 %, mean over the held-out domains or the UDA pairs), and
the verdict.

Rule for "reproduced" (also printed under the table): the method's ``avg_accuracy`` is strictly
higher than the baseline's at the same seed, in every seed. ``x/n`` counts the seeds the method
wins. Zero-shot CLIP trains nothing and tests on whole target domains, so its result does not
depend on the seed: a zero-shot arm runs once, at the first seed, and that one value is the
baseline of every seed (its cell has no ± std). A row with a missing or failed run is "incomplete".

Claims (``--only`` takes the names on the left):

* ``coop``: CoOp beats zero-shot CLIP ("a photo of a [class].") on held-out domains
  (leave-one-domain-out on the demo world);
* ``promptstyler``: PromptStyler beats zero-shot "[class]" and "a photo of a [class]." without
  seeing an image;
* ``dapl``: DAPL beats zero-shot CLIP on the 12 ordered UDA pairs, and its target term matters
  (DAPL vs DAPL with U = 0);
* ``dapt``: DAPT beats CoOp at 4 shots per class (leave-one-domain-out), and its dispersion terms
  matter (DAPT vs DAPT with β_v = β_t = 0);
* ``domainfusion``: DomainFusion beats the same classifier trained without the LDM (no
  distillation, no augmentation round), and its online augmentation adds to the distillation
  (distillation only vs both).

Ablations: DAPL ``method.U=0``; DAPT ``method.beta_v=0 method.beta_t=0``; DomainFusion
``method.distill_weight=0`` (no distillation) and ``method.augment_every=1000`` (no augmentation round:
rounds come at evaluation periods T, 2T, ... below the 20 periods). When an arm's folder holds several finished
records of one seed (a rerun with other ``--extra``), the newest counts and the output says so.

Demo-scale overrides (every other value is the method YAML's default); each is written next to it
in :data:`ARMS` with its reason:

* CoOp, DAPL and DAPT ``method.augment=none`` (promptdg's cheaper protocol, marked in the tables):
  the official random resized crops down to 8 % of a 32-pixel digit, and mirrored digits, destroy
  the class (as ``make demo``);
* DomainFusion ``method.train_encoder=false method.synthetic_fraction=0.25 method.img2img_steps=10``:
  ``make demo``'s settings for 2 CPU cores, the same in all three DomainFusion arms, with DomainBed's
  step schedule shortened to 1,084 steps in 20 evaluation periods (``method.steps=1084
  method.checkpoint_freq=57``, about the former 20 epochs; not make demo's 229 steps: the rounds at
  periods 5, 10 and 15 happen).

Usage:
    python scripts/claims.py [--seeds 1,2,3] [--only coop,dapl] [--out outputs/claims] [--jobs 2]
    python scripts/claims.py --debug --extra backbone.pretrained=<file> ...   # tiny settings, tiny world

``--debug`` adds each method's ``+debug=<method>`` tiny settings and the tiny world (8 images per
class, in its own folder ``demo_digits_tiny`` so that the real demo world in the cache stays), and
writes to ``outputs/claims-debug`` unless ``--out`` says otherwise. ``--extra`` overrides go to
every run of the selected claims. Output: the table on stdout and in ``<out>/claims.md``, every
number in ``<out>/claims.json``, and the wall time of the whole run.

``--jobs N`` (default 1: the arms one after another in this process) runs N arms at a time, each a
``python -m promptdg_cli`` process with ``OMP_NUM_THREADS`` = cores // N (unless it is set), its output
in ``<out>/<arm>.log``; the arms start longest first by their times in the last ``claims.json``
(without one, DomainFusion's first). A run on the demo world keeps one thread busy, not two, so on
2 cores ``--jobs 2`` nearly halves the prompt-learning arms (the accuracies can differ from a
two-thread run in the last digits: float sums in another order). Before the arms,
``python -m promptdg_cli.demo.assets`` builds what they share (the demo world, CLIP and, with a
DomainFusion arm, LDM) alone on all cores: a build next to a running arm would oversubscribe the
cores (output: ``<out>/assets.log``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from promptdg_cli.cli import main as promptdg
from promptdg_cli.collect.records import load_records


# --------------------------------------------------------------------- what is compared
@dataclass(frozen=True)
class Arm:
    """One sweep: ``promptdg train -m method=<method> seed=<seeds> <overrides>`` into ``<out>/<key>``."""

    key: str  # its folder under --out
    label: str  # as printed
    method: str  # the method= choice
    family: str  # the registered method: its tiny settings are conf/debug/<family>.yaml
    overrides: Tuple[str, ...] = ()
    seed_free: bool = False  # zero-shot: one run at the first seed stands for every seed
    debug: Tuple[str, ...] = ()  # added in --debug only (to keep an arm comparable to its pair)
    schedule: Tuple[str, ...] = ()  # left out in --debug, where conf/debug/<family>.yaml sets the schedule


@dataclass(frozen=True)
class Row:
    """One comparison: the method arm against the baseline arm."""

    claim: str  # the --only name
    text: str
    paper: str
    baseline: str  # an ARMS key
    method: str  # an ARMS key


# demo scale: the official crops to 8 % of a 32-px digit and flips destroy the class (make demo)
NO_AUGMENT = ("method.augment=none",)
DAPT_4SHOT = ("shots=4",) + NO_AUGMENT
DOMAINFUSION_DEMO = (
    # demo scale, as make demo (2 CPU cores): the head on the frozen encoder's cached features, a
    # quarter of the source images with a synthetic copy, 10 DDIM steps per img2img candidate, and
    # 1,084 steps in 20 evaluation periods of 57 steps (make demo's 229 steps are not taken: the 20
    # periods keep the augmentation rounds at periods 5, 10 and 15 that the claims compare)
    "method.train_encoder=false",
    "method.synthetic_fraction=0.25",
    "method.img2img_steps=10",
)
DOMAINFUSION_SCHEDULE = ("method.steps=1084", "method.checkpoint_freq=57")  # (the arms' schedule field)
NO_ROUND = "method.augment_every=1000"  # rounds start at periods T, 2T, ... < 20 periods: none

ARMS: Dict[str, Arm] = {
    a.key: a
    for a in (
        Arm("zeroshot", 'zero-shot "a photo of a [class]."', "zeroshot", "zeroshot", seed_free=True),
        Arm("zeroshot_name", 'zero-shot "[class]"', "zeroshot_name", "zeroshot", seed_free=True),
        Arm("coop", "CoOp", "coop", "coop", NO_AUGMENT),
        Arm("promptstyler", "PromptStyler", "promptstyler", "promptstyler"),
        # +debug=dapl trains on one source (printed): the zero-shot pairs follow it in --debug
        Arm(
            "zeroshot_uda",
            'zero-shot "a photo of a [class]." (UDA pairs)',
            "zeroshot",
            "zeroshot",
            ("dataset.protocol=uda",),
            seed_free=True,
            debug=("source=[printed]",),
        ),
        Arm("dapl", "DAPL", "dapl", "dapl", NO_AUGMENT),
        Arm("dapl_U0", "DAPL, U = 0 (no target term)", "dapl", "dapl", NO_AUGMENT + ("method.U=0",)),
        Arm("coop_4shot", "CoOp, 4 shots", "coop", "coop", DAPT_4SHOT),
        Arm("dapt_4shot", "DAPT, 4 shots", "dapt", "dapt", DAPT_4SHOT),
        Arm(
            "dapt_4shot_no_dispersion",
            "DAPT, 4 shots, β_v = β_t = 0",
            "dapt",
            "dapt",
            DAPT_4SHOT + ("method.beta_v=0", "method.beta_t=0"),
        ),
        Arm(
            "domainfusion",
            "DomainFusion",
            "domainfusion",
            "domainfusion",
            DOMAINFUSION_DEMO,
            schedule=DOMAINFUSION_SCHEDULE,
        ),
        Arm(
            "domainfusion_no_ldm",
            "DomainFusion without the LDM (λ = 0, no round)",
            "domainfusion",
            "domainfusion",
            DOMAINFUSION_DEMO + ("method.distill_weight=0", NO_ROUND),
            schedule=DOMAINFUSION_SCHEDULE,
        ),
        Arm(
            "domainfusion_distill_only",
            "DomainFusion, distillation only (no round)",
            "domainfusion",
            "domainfusion",
            DOMAINFUSION_DEMO + (NO_ROUND,),
            schedule=DOMAINFUSION_SCHEDULE,
        ),
    )
}

ROWS: Tuple[Row, ...] = (
    Row("coop", "CoOp beats zero-shot CLIP on held-out domains",
        "CoOp (IJCV 2022), domain generalization table", "zeroshot", "coop"),
    Row("promptstyler", 'PromptStyler beats zero-shot "[class]" without seeing an image',
        "PromptStyler (ICCV 2023), Table 2", "zeroshot_name", "promptstyler"),
    Row("promptstyler", 'PromptStyler beats zero-shot "a photo of a [class]." without seeing an image',
        "PromptStyler (ICCV 2023), Table 2", "zeroshot", "promptstyler"),
    Row("dapl", "DAPL beats zero-shot CLIP on the 12 UDA pairs",
        "DAPL (TNNLS 2023), Office-Home and VisDA-2017 tables", "zeroshot_uda", "dapl"),
    Row("dapl", "DAPL's target term matters (DAPL vs U = 0)",
        "DAPL (TNNLS 2023), ablation", "dapl_U0", "dapl"),
    Row("dapt", "DAPT beats CoOp at the same shots (4 per class, held-out domains)",
        "DAPT (ICCV 2023), few-shot table", "coop_4shot", "dapt_4shot"),
    Row("dapt", "DAPT's dispersion terms matter (DAPT vs β_v = β_t = 0)",
        "DAPT (ICCV 2023), ablation", "dapt_4shot_no_dispersion", "dapt_4shot"),
    Row("domainfusion", "DomainFusion beats the same classifier trained without the LDM",
        "DomainFusion (ECCV 2024), ablation", "domainfusion_no_ldm", "domainfusion"),
    Row("domainfusion", "DomainFusion's online augmentation adds to the distillation",
        "DomainFusion (ECCV 2024), ablation", "domainfusion_distill_only", "domainfusion"),
)
CLAIMS = tuple(dict.fromkeys(r.claim for r in ROWS))

LEGEND = (
    "Reproduced: the method's avg accuracy is strictly higher than the baseline's at the same seed, in "
    "every seed; x/n counts the seeds the method wins. A value without ± is zero-shot CLIP: it trains "
    "nothing and tests on whole target domains, so one run stands for every seed. Accuracy: top-1 %, "
    "the run's avg_accuracy (mean over held-out domains, or over UDA pairs), mean ± sample std over seeds."
)
TINY_WORLD = ("dataset.generator_args.per_class=8", "dataset.folder=demo_digits_tiny")


# --------------------------------------------------------------------- aggregation and verdict
def seed_values(records: Sequence[Mapping], seeds: Sequence[int]) -> Tuple[Dict[int, float], int]:
    """``{seed: avg_accuracy}`` of the finished records of the requested seeds, and how many older
    records were passed over (the newest record of a seed wins, by ``_mtime``)."""
    newest: Dict[int, Mapping] = {}
    passed_over = 0
    for rec in records:
        if rec.get("status") != "finished" or rec.get("seed") not in seeds:
            continue
        old = newest.get(rec["seed"])
        if old is not None:
            passed_over += 1
            if old.get("_mtime", 0) >= rec.get("_mtime", 0):
                continue
        newest[rec["seed"]] = rec
    return {s: float(newest[s]["avg_accuracy"]) for s in seeds if s in newest}, passed_over


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n − 1); std is None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def baseline_at(base: Mapping[int, float], seed: int, seed_free: bool) -> Optional[float]:
    """The baseline's value at ``seed``: its own, or a seed-free arm's one value."""
    if seed_free:
        return next(iter(base.values()), None)
    return base.get(seed)


def paired_wins(method: Mapping[int, float], base: Mapping[int, float], seeds: Sequence[int],
                base_seed_free: bool) -> Tuple[int, int]:
    """(seeds where the method is strictly higher than the baseline, seeds where both have a value)."""
    wins = paired = 0
    for s in seeds:
        b = baseline_at(base, s, base_seed_free)
        if s in method and b is not None:
            paired += 1
            wins += method[s] > b
    return wins, paired


def verdict(wins: int, paired: int, n_seeds: int) -> str:
    """"reproduced" when the method wins every seed, "not reproduced" when a complete comparison has
    a seed it does not win, "incomplete" when a seed lacks a run; with x/n."""
    if paired < n_seeds:
        return f"incomplete ({paired} of {n_seeds} seeds)"
    return f"{'reproduced' if wins == n_seeds else 'not reproduced'} ({wins}/{n_seeds})"


def compare(row: Row, values: Mapping[str, Mapping[int, float]], seeds: Sequence[int]) -> dict:
    """Everything printed for one row, and the per-seed values."""
    base_arm, method_arm = ARMS[row.baseline], ARMS[row.method]
    base, method = values[row.baseline], values[row.method]
    wins, paired = paired_wins(method, base, seeds, base_arm.seed_free)
    b_mean, b_std = mean_std(list(base.values()))
    m_mean, m_std = mean_std(list(method.values()))
    return {
        "claim": row.claim, "text": row.text, "paper": row.paper,
        "baseline": base_arm.label, "baseline_arm": row.baseline, "baseline_seed_free": base_arm.seed_free,
        "baseline_per_seed": {str(s): v for s, v in base.items()}, "baseline_mean": b_mean, "baseline_std": b_std,
        "method": method_arm.label, "method_arm": row.method,
        "method_per_seed": {str(s): v for s, v in method.items()}, "method_mean": m_mean, "method_std": m_std,
        "wins": wins, "paired_seeds": paired, "seeds": list(seeds),
        "reproduced": paired == len(seeds) and wins == len(seeds), "verdict": verdict(wins, paired, len(seeds)),
    }


# --------------------------------------------------------------------- output
def cell(mean: Optional[float], std: Optional[float], n: int, n_seeds: int, seed_free: bool) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
    return text if seed_free or n == n_seeds else f"{text} ({n}/{n_seeds} seeds)"


def markdown(results: Sequence[dict], seeds: Sequence[int], wall_s: float, notes: Sequence[str]) -> str:
    n = len(seeds)
    lines = [f"# Claims on the demo world (seed{'s' if n > 1 else ''} {', '.join(map(str, seeds))})", "",
             "| Claim | Paper | Baseline | Baseline acc. | Method | Method acc. | Verdict |",
             "|:---|:---|:---|---:|:---|---:|:---|"]
    for r in results:
        b = cell(r["baseline_mean"], r["baseline_std"], len(r["baseline_per_seed"]), n, r["baseline_seed_free"])
        m = cell(r["method_mean"], r["method_std"], len(r["method_per_seed"]), n, False)
        lines.append(f"| {r['text']} | {r['paper']} | {r['baseline']} | {b} | {r['method']} | {m} | {r['verdict']} |")
    lines += ["", LEGEND, "", f"Wall time: {duration(wall_s)}."]
    lines += [f"* {note}" for note in notes]
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return (f"{h} h " if h else "") + (f"{m} min " if h or m else "") + f"{s} s"


# --------------------------------------------------------------------- running
def sweep_args(arm: Arm, seeds: Sequence[int], out: Path, debug: bool, extra: Sequence[str]) -> List[str]:
    """The ``promptdg`` command line of one arm."""
    run_seeds = seeds[:1] if arm.seed_free else seeds
    args = ["train", "-m", f"method={arm.method}", "seed=" + ",".join(map(str, run_seeds)), f"out_root={out / arm.key}"]
    if debug:
        args += [f"+debug={arm.family}", *TINY_WORLD, *arm.debug]
    return args + list(arm.overrides) + ([] if debug else list(arm.schedule)) + list(extra)


def run_arm(args: Sequence[str]) -> int:
    print("$ promptdg " + " ".join(args), flush=True)
    try:
        return promptdg(list(args))
    except SystemExit as e:  # Hydra's composition errors
        return e.code if isinstance(e.code, int) else 1


ARM_COMMAND = [sys.executable, "-m", "promptdg_cli"]  # an arm's process under --jobs


def run_arms_parallel(arm_args: Mapping[str, Sequence[str]], jobs: int, out: Path,
                      timings: Dict[str, float]) -> Dict[str, int]:
    """Run the arms ``jobs`` at a time as processes (``ARM_COMMAND`` + the arm's args), each with its
    share of the cores and its output in ``<out>/<arm>.log``; an arm's exit code by its key. After an
    arm stopped by a signal (exit > 128) no other arm starts, and the running ones are waited for; if
    this loop is interrupted (Ctrl-C), the running arms get SIGTERM (promptdg stops at a checkpoint)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    queue, running, codes = list(arm_args), {}, {}
    out.mkdir(parents=True, exist_ok=True)

    def start(key: str) -> None:
        log = open(out / f"{key}.log", "a", encoding="utf-8")
        log.write("$ promptdg " + " ".join(arm_args[key]) + "\n")
        log.flush()
        print(f"$ promptdg {' '.join(arm_args[key])}   (output: {out / f'{key}.log'})", flush=True)
        proc = subprocess.Popen([*ARM_COMMAND, *arm_args[key]], stdout=log, stderr=subprocess.STDOUT, env=env)
        running[key] = (proc, log, time.perf_counter())

    def reap() -> None:
        for key, (proc, log, t) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[key], timings[key] = proc.returncode, time.perf_counter() - t
                del running[key]
                print(
                    f"claims: {key} finished with exit code {proc.returncode} in {duration(timings[key])}", flush=True
                )

    try:
        while queue or running:
            if any(c > 128 for c in codes.values()):
                queue.clear()
            while queue and len(running) < jobs:
                start(queue.pop(0))
            time.sleep(0.2)
            reap()
    finally:
        for proc, log, _ in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return codes


PREPARE_COMMAND = [sys.executable, "-m", "promptdg_cli.demo.assets"]  # the shared models, before the arms under --jobs


def prepare_assets(ldm: bool, extra: Sequence[str], out: Path) -> int:
    """Build the demo world, the demo CLIP and (``ldm``) the demo LDM if missing, in one process on all
    cores before the arms start (``promptdg_cli/demo/assets.py`` says why); its output in
    ``<out>/assets.log``. Returns its exit code."""
    out.mkdir(parents=True, exist_ok=True)
    args = [*PREPARE_COMMAND, *(["--ldm"] if ldm else []), *extra]
    print(f"claims: the shared demo models first, on all cores (output: {out / 'assets.log'})", flush=True)
    with open(out / "assets.log", "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(args) + "\n")
        log.flush()
        code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        tail = (out / "assets.log").read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        print(f"claims: building the shared demo models exited with {code}; no arm was started", file=sys.stderr)
    return code


def arm_order(keys: Sequence[str], out: Path) -> List[str]:
    """``keys`` longest first by the arm times of the last ``<out>/claims.json`` (unknown ones first, in
    their order): with several arms at a time, a long arm started last would run alone at the end.
    Without a last run, DomainFusion's arms first (on 2 cores two of them take 25 and 13 of the table's
    32 minutes; every other arm 5 or less), the others in their order."""
    try:
        last = json.loads((out / "claims.json").read_text())["arm_wall_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(keys, key=lambda k: ARMS[k].family != "domainfusion")  # (a stable sort)
    return sorted(keys, key=lambda k: -float(last.get(k, float("inf"))))


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"claims: --seeds={text!r} is not a comma-separated list of integers (e.g. 1,2,3)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"claims: --seeds={text!r} needs at least one seed and no repeats (e.g. 1,2,3)")
    return seeds


def parse_only(text: Optional[str]) -> List[str]:
    if not text:
        return list(CLAIMS)
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CLAIMS]
    if bad or not names:
        raise SystemExit(
            f"claims: --only={text!r}: {bad[0] if bad else ''!r} is not a claim. Valid: {', '.join(CLAIMS)}"
        )
    return [c for c in CLAIMS if c in names]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=LEGEND)
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    ap.add_argument("--only", default=None, help=f"comma-separated claims (default all: {','.join(CLAIMS)})")
    ap.add_argument(
        "--out", default=None, help="output folder (default outputs/claims; outputs/claims-debug with --debug)"
    )
    ap.add_argument("--debug", action="store_true", help="each method's +debug=<method> settings and the tiny world")
    ap.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE", help="overrides added to every run")
    ap.add_argument("--jobs", type=int, default=1, help="arms run at a time, each in its own process (default 1)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    seeds, claims = parse_seeds(args.seeds), parse_only(args.only)
    out = Path(args.out or ("outputs/claims-debug" if args.debug else "outputs/claims"))
    rows = [r for r in ROWS if r.claim in claims]
    arms = list(dict.fromkeys(k for r in rows for k in (r.baseline, r.method)))
    if args.jobs < 1:
        raise SystemExit(f"claims: --jobs={args.jobs} must be at least 1 (the arms run at a time)")
    start = time.perf_counter()
    notes, timings, codes = [], {}, {}
    if args.jobs == 1:
        for key in arms:
            t = time.perf_counter()
            codes[key] = run_arm(sweep_args(ARMS[key], seeds, out, args.debug, args.extra))
            timings[key] = time.perf_counter() - t
            if codes[key] > 128:
                break
    else:
        if not args.debug:  # (the tiny world and models of --debug take seconds to build)
            code = prepare_assets(any(ARMS[k].family == "domainfusion" for k in arms), args.extra, out)
            if code:
                return code
        arm_args = {k: sweep_args(ARMS[k], seeds, out, args.debug, args.extra) for k in arm_order(arms, out)}
        codes = run_arms_parallel(arm_args, args.jobs, out, timings)
    for key in arms:
        code = codes.get(key, 0)
        if code > 128:  # stopped by a signal (promptdg's preemption exits 128 + the signal): stop too
            print(f"claims: the sweep of {key} was stopped (exit code {code}); rerun the same command to "
                  "resume (finished runs are reused)", file=sys.stderr)
            return code
        if code:
            notes.append(f"the sweep of {key} exited with {code} (see {out / key}): its failed runs are left out")
    values = {}
    for key in arms:
        records, skipped = load_records(out / key)
        values[key], passed_over = seed_values(records, seeds[:1] if ARMS[key].seed_free else seeds)
        if passed_over:
            notes.append(f"{key}: {passed_over} older record(s) of the same seed passed over (the newest counts)")
        notes += [f"{key}: unreadable record {path}: {why}" for path, why in skipped]
    results = [compare(r, values, seeds) for r in rows]
    wall = time.perf_counter() - start
    text = markdown(results, seeds, wall, notes)
    print("\n" + text, end="")
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(text, encoding="utf-8")
    payload = {"seeds": seeds, "claims": claims, "debug": args.debug, "extra": args.extra, "rule": LEGEND,
               "rows": results, "arm_wall_s": timings, "wall_s": wall, "notes": notes}
    (out / "claims.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    complete = all(r["paired_seeds"] == len(seeds) for r in results)
    return 0 if complete and not any("exited with" in n for n in notes) else 1


if __name__ == "__main__":
    sys.exit(main())
