"""The method registry: every method module is imported here, explicitly.

Registration never depends on who imported what: ``REGISTRY`` is complete as soon as this package
is imported. ``get_method`` names the valid choices and the nearest match for a typo.
"""
from __future__ import annotations

import difflib

from ..config import ConfigError
from .base import Method
from .coop import CoOp
from .dapl import DAPL
from .dapt import DAPT
from .domainfusion import DomainFusion
from .linear_probe import LinearProbe
from .promptstyler import PromptStyler
from .zeroshot import ZeroShot

REGISTRY: dict[str, type[Method]] = {
    "zeroshot": ZeroShot,
    "linear_probe": LinearProbe,
    "coop": CoOp,
    "promptstyler": PromptStyler,
    "dapl": DAPL,
    "dapt": DAPT,
    "domainfusion": DomainFusion,
}


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"method={name!r} is not registered. Valid: {', '.join(REGISTRY)}.{hint}")
    return REGISTRY[name]
