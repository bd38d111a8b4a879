"""Build what demo-world runs share before they start: the demo world, the demo CLIP and (``--ldm``)
the demo LDM, each only if it is not cached.

    python -m promptdg_cli.demo.assets [--ldm] [key=value ...]   # overrides as for promptdg train

Runs that start at once build a missing model only once anyway (``compute_once.build_once``), but
the one that builds it trains with ``BUILD_THREADS`` torch threads (``demo/__init__.py``) next to the
others: ``scripts/claims.py --jobs 2`` gives each arm one of 2 cores, and a two-thread LDM build
next to a one-thread arm oversubscribes the cores (one UNet step: 0.20 s alone, 0.83 s next to a
busy one-thread process). So the claims script runs this first, alone, then starts its arms.
The config is composed as ``promptdg train method=domainfusion <overrides>`` (the backbone, the
dataset and ``method.ldm`` are what count: with ``method.ldm`` other than ``demo`` nothing is built
for it). Prints one line per asset with its path; a build prints its own progress.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config import compose_run


def prepare_demo_assets(overrides: Sequence[str] = (), ldm: bool = False) -> dict:
    """Generate the run's dataset and build its backbone (and, with ``ldm``, the demo LDM) if they are
    missing; returns {"dataset": path, "backbone": path, "ldm": path or None}."""
    from ..backbone import ClipBackbone  # noqa: F401  (the torchvision shim before open_clip and diffusers)
    from ..data import dataset_dir
    from ..devices import select_device
    from ..methods.domainfusion import resolve_ldm
    from ..runner import prepare_backbone
    from .ldm import ensure_demo_ldm

    cfg = compose_run("method=domainfusion", *overrides)
    out = {"dataset": str(dataset_dir(cfg.dataset)), "backbone": str(cfg.backbone.pretrained), "ldm": None}
    backbone = prepare_backbone(cfg.backbone, select_device(str(cfg.device)))
    if ldm and resolve_ldm(cfg.method.ldm, backbone) == "demo":
        out["ldm"] = str(ensure_demo_ldm(str(cfg.cache_root), backbone))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ldm = "--ldm" in args
    overrides = [a for a in args if a != "--ldm"]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        print(f"promptdg_cli.demo.assets: {bad[0]!r} is not a key=value override (usage: [--ldm] [key=value ...])",
              file=sys.stderr)
        return 2
    for name, path in prepare_demo_assets(overrides, ldm).items():
        if path:
            print(f"[promptdg] demo asset ready: {name} {Path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
