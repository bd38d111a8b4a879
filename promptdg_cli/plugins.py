"""What plugs into promptdg by name: dataset generators, backbone builders and latent diffusion models.

A dataset config's ``generator`` (a dataset written on first use), a backbone config's ``builder`` (a
checkpoint built on first use) and DomainFusion's ``method.ldm`` name something another package
provides, through a Python entry point of its package metadata::

    [project.entry-points."promptdg.dataset_generators"]
    my_world = "mypkg.world:generate"        # generate(folder, **dataset.generator_args) -> folder

The demo world registers itself the same way (promptdg's pyproject.toml: ``demo_digits`` in the first
two groups, ``demo`` in ``promptdg.ldms``), so the core never imports it. ``module:function`` works
in a config too, for code on the Python path that is not installed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Callable, Dict

from .errors import ConfigError

GROUPS: Dict[str, str] = {
    "dataset generator": "promptdg.dataset_generators",  # generate(folder, **generator_args) -> folder
    "backbone builder": "promptdg.backbone_builders",  # build(checkpoint path, open_clip model name) -> path
    "ldm": "promptdg.ldms",  # build(cache_root, clip backbone) -> folder of an LDM in the diffusers layout
}


def names(kind: str) -> list:
    """The names registered for ``kind``."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=GROUPS[kind]))


def has(kind: str, name: str) -> bool:
    return name in names(kind)


def load(kind: str, name: str, key: str) -> Callable:
    """The callable registered as ``name`` for ``kind`` (or a ``module:function`` path); ``key`` is the
    config key that named it (for the error)."""
    for ep in importlib.metadata.entry_points(group=GROUPS[kind]):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{key}={name!r} cannot be imported ({type(e).__name__}: {e})") from e
    raise ConfigError(f"{key}={name!r} is not a registered {kind}. Valid: {', '.join(names(kind)) or '(none)'} "
                      f"(entry points of the group {GROUPS[kind]!r}), or module:function")
