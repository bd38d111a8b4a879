"""The method registry: every built-in method by name and where its class lives (torch-free).

The table is complete as soon as this package is imported, so registration never depends on who
imported what; a class is imported when a run asks for it. A method outside the package is named by
its config instead: ``_target_: mypkg.my_method.MyMethod`` in the user's ``method/<name>.yaml``
(README: "Extending promptdg"). An unknown name lists the valid ones and the nearest match.
"""
from __future__ import annotations

import difflib
import importlib

from ..errors import ConfigError

REGISTRY: dict[str, str] = {
    "zeroshot": "promptdg_cli.methods.zeroshot:ZeroShot",
    "linear_probe": "promptdg_cli.methods.linear_probe:LinearProbe",
    "coop": "promptdg_cli.methods.coop:CoOp",
    "promptstyler": "promptdg_cli.methods.promptstyler:PromptStyler",
    "dapl": "promptdg_cli.methods.dapl:DAPL",
    "dapt": "promptdg_cli.methods.dapt:DAPT",
    "domainfusion": "promptdg_cli.methods.domainfusion:DomainFusion",
    "erm": "promptdg_cli.methods.erm:ERM",
}


def get_method(name: str) -> type:
    """The class of a built-in method."""
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"method={name!r} is not registered. Valid: {', '.join(REGISTRY)}.{hint}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def method_class(method_cfg) -> type:
    """The class of a run's method: ``method._target_`` (a method outside the package), else by name."""
    target = method_cfg.get("_target_") if hasattr(method_cfg, "get") else None
    if not target:
        return get_method(str(method_cfg.name))
    module, _, cls = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"method._target_={target!r} cannot be imported ({type(e).__name__}: {e}); "
                          f"give the full dotted path of a Method subclass on the Python path") from e
