"""Make the pinned torchvision importable next to a CPU-only torch.

The torchvision 0.28.0 wheel on PyPI is a CUDA build. With the CPU torch wheel its compiled ops
library fails to load, and ``import torchvision`` then raises ``operator torchvision::nms does not
exist`` while registering fake kernels. open_clip, timm and diffusers all import torchvision, so
this module runs first (``promptdg_cli.backbone`` imports it): it tries to load torchvision's own
``_C`` library, and only if that fails declares the two operator schemas that torchvision's Python
side expects. Nothing here runs those ops; promptdg loads images with PIL and never calls nms.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_LIB = None  # keep the Library object alive: dropping it would unregister the schemas


def ensure_torchvision_importable() -> None:
    global _LIB
    if _LIB is not None or _torchvision_ops_registered():
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = list(spec.submodule_search_locations)[0]
    for name in os.listdir(folder):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
            except (OSError, RuntimeError):
                break  # a CUDA build next to a CPU torch: fall through to the schema stubs
            if _torchvision_ops_registered():
                return
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _torchvision_ops_registered() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return True
    except RuntimeError:
        return False


ensure_torchvision_importable()
