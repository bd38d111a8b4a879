"""``promptdg generate``: a generated copy of a dataset's source domains, written to disk.

A method that generates data (``Method.generates``) provides ``write_round`` (today: DomainFusion's
online lightweight augmentation, through ``synthetic.py``). Every image of the source domains (all domains but
``target``) goes through ``method.generate_rounds`` rounds and is written as
``<run_dir>/images/<dataset folder>/<domain>/<class>/<image>.png``; the held-out domain is linked
from the real dataset, so the folder is a dataset for the same leave-one-domain-out split
(``data_root=<run_dir>/images``). Resumable batch by batch; a finished set is never rewritten.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .data import class_names, dataset_dir, list_domain
from .devices import loader_workers, select_device
from .errors import ConfigError
from .extras import require
from .files import write_json_atomic
from .methods import method_class
from .methods.base import RunEnv
from .protocols import check_domains
from .runner import prepare_backbone
from .synthetic import round_seed
from .training import make_files


def generate(cfg, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    cls = method_class(cfg.method)
    if not cls.generates:
        raise ConfigError(f"method={cfg.method.name} does not generate images. Methods that do: domainfusion.")
    for extra in cls.extras:
        require(extra, f"promptdg generate method={cfg.method.name}")
    done = run_dir / "generated.json"
    if done.is_file():
        info = json.loads(done.read_text())
        print(
            f"[promptdg] {run_dir}/images is finished ({info['images']} images); not rewriting it. "
            f"Remove the folder to generate again."
        )
        return info
    sources = check_domains(cfg.dataset, cfg.target, cfg.source)
    if cfg.target:
        sources = [d for d in sources if d != cfg.target]
    root = dataset_dir(cfg.dataset)
    device = select_device(cfg.device)
    backbone = prepare_backbone(cfg.backbone, device)
    env = RunEnv(
        seed=int(cfg.seed),
        num_workers=loader_workers(cfg.num_workers)[0],
        cache_root=str(cfg.cache_root),
        dataset=str(cfg.dataset.name),
    )
    method = cls(cfg.method, backbone, class_names(cfg.dataset), device, env)
    out_root = run_dir / "images" / cfg.dataset.folder
    folders, rounds = list(cfg.dataset.classes.keys()), int(cfg.method.generate_rounds)
    total, recovered = 0, []
    for domain in sources:
        paths, labels = list_domain(cfg.dataset, domain)
        current = [str(p) for p in paths]
        for r in range(1, rounds + 1):
            outs = [
                (out_root / domain / folders[c] / f"{Path(p).stem}.png")
                if r == rounds
                else (run_dir / "rounds" / f"round{r}" / domain / f"{k:06d}.png")
                for k, (p, c) in enumerate(zip(paths, labels))
            ]
            recovered += method.write_round(
                current, labels, outs, round_seed(int(cfg.seed), r), f"generate {domain} round {r}", make_files
            )
            current = [str(o) for o in outs]
        total += len(paths)
    if cfg.target:
        link = out_root / cfg.target
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((root / cfg.target).resolve(), link, target_is_directory=True)
    info = {
        "images": total,
        "sources": sources,
        "target": cfg.target,
        "rounds": rounds,
        "generated_images": total * cfg.method.candidates * rounds,
        "ldm": method.generator_name(),
        "dataset_root": str(run_dir / "images"),
        "recovered": recovered,
    }
    write_json_atomic(done, info)
    print(
        f"[promptdg] wrote {total} augmented images of {', '.join(sources)} to {out_root} "
        f"({info['generated_images']} img2img candidates). Use it as a dataset: "
        f"data_root={run_dir / 'images'} dataset={cfg.dataset.name}"
    )
    return info
