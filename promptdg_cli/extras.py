"""Optional extras: the packages a feature needs beyond the core install, and the clear error when
one is missing. Torch-free; nothing here imports the packages it names (``find_spec`` only).

``pip install 'promptdg[<extra>]'`` installs an extra (``pyproject.toml``'s optional dependencies,
pinned in ``constraints.txt``); ``make install`` installs them all for the tests.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Tuple

from .errors import UserError

# extra -> (the modules it provides, what needs it)
EXTRAS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "domainfusion": (("diffusers", "transformers"), "DomainFusion and the demo LDM (a latent diffusion model)"),
    "plots": (("matplotlib",), "the figures of `promptdg collect`"),
    "tensorboard": (("tensorboard",), "logger=tensorboard"),
    "wandb": (("wandb",), "logger=wandb"),
    "mlflow": (("mlflow",), "logger=mlflow"),
}


class MissingExtra(UserError, ImportError):
    """A feature's optional packages are not installed: names the extra that installs them."""


def missing(extra: str) -> Tuple[str, ...]:
    """The modules of ``extra`` that cannot be imported here (without importing them)."""
    out = []
    for module in EXTRAS[extra][0]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
            found = False
        if not found:
            out.append(module)
    return tuple(out)


def message(extra: str, absent, purpose: str = "") -> str:
    what = purpose or EXTRAS[extra][1]
    return (f"{what} needs {', '.join(absent)}, which is not installed: pip install 'promptdg[{extra}]' "
            f"(or `make install` in a clone, which installs every extra)")


def require(extra: str, purpose: str = "") -> None:
    """Raise :class:`MissingExtra` naming ``extra`` when one of its modules is not installed."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    absent = missing(extra)
    if absent:
        raise MissingExtra(message(extra, absent, purpose))
