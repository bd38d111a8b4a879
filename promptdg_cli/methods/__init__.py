"""Which class runs a method: the one its config names with ``_target_`` (torch-free until it is imported).

Every method, built-in or a user's, is a class and a YAML in a ``method`` config group whose
``_target_`` names the class (``promptdg_cli.methods.coop.CoOp``; ``mylab.linear_head.LinearHead`` in
the user's ``myconf/method/linear_head.yaml``, README: "Extending promptdg"). The built-in methods are
the YAMLs of ``conf/method``; nothing else lists them. A class is imported when a run asks for it. A
run config written without ``_target_`` (by promptdg 0.1) finds its class through the built-in YAML of
its method name. An unknown name lists the valid ones and the nearest match.
"""
from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Dict, Type

import yaml

from .. import conf_dir
from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Method


def builtin_methods() -> Dict[str, str]:
    """Every built-in method config (conf/method/<choice>.yaml) -> the class its ``_target_`` names; a
    config that extends another (``defaults: [dapl]``) names its parent's class."""
    folder = conf_dir() / "method"
    raw = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted(folder.glob("*.yaml"))}

    def target(choice: str, seen=()) -> str:
        node = raw[choice]
        if node.get("_target_"):
            return str(node["_target_"])
        parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d in raw and d not in seen]
        return target(parents[0], seen + (choice,)) if parents else ""

    return {choice: target(choice) for choice in raw}


def method_class(method_cfg) -> Type[Method]:
    """The class of a run's method: its ``_target_``, else the built-in config of its name."""
    target = method_cfg.get("_target_") if hasattr(method_cfg, "get") else None
    if not target:
        name = str(method_cfg.get("name") if hasattr(method_cfg, "get") else method_cfg)
        known = builtin_methods()
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=1)
            raise ConfigError(f"method={name!r} is not a method config. Valid: {', '.join(known)}."
                              + (f" Did you mean {near[0]!r}?" if near else ""))
        target = known[name]
    module, _, cls = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"method._target_={target!r} cannot be imported ({type(e).__name__}: {e}); "
                          f"give the full dotted path of a Method subclass on the Python path") from e
