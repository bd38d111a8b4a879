"""The method interface: what the engine asks of every method.

A method is built from its config, the frozen backbone and the class names; ``fit`` trains it on
the source data of one split (cached image features, or no images at all), and ``logits`` scores
cached image features. Training state goes through ``TrainContext`` so checkpoints, resume,
metrics and model selection are the engine's business, not each method's.
"""
from __future__ import annotations

from typing import ClassVar, Dict, Optional, Type

import torch

from ..schema import MethodConfig


class Method:
    Config: ClassVar[Type[MethodConfig]] = MethodConfig
    trains: ClassVar[bool] = True  # False: evaluation only (zero-shot)
    needs_vit: ClassVar[bool] = False  # True: a ResNet backbone is a config error
    # True: trains on no images at all (source-free DG); fit() gets an empty data dict and the
    # model is tested on every domain of the dataset
    source_free: ClassVar[bool] = False
    cache_root: Optional[str] = None  # the run's cache root (methods that build cached models: the demo LDM)
    num_workers: int = 0  # image-loading workers, for methods that read images (set by the engine from the run)
    # "uda": always runs the UDA protocol (labelled sources, unlabelled target in training);
    # None: the dataset's protocol
    protocol: ClassVar[Optional[str]] = None

    def __init__(self, cfg, backbone, classnames: list[str], device: torch.device):
        self.cfg, self.backbone, self.classnames, self.device = cfg, backbone, classnames, device

    def fit(self, data: Dict[str, "object"], ctx) -> None:
        """Train on data['train'], select on data['val'] (both source only)."""

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised image features -> (B, C) class scores."""
        raise NotImplementedError

    def extra_results(self) -> Dict[str, float]:
        """Counters a split adds to the run's record (DomainFusion: images generated); summed over splits."""
        return {}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        pass
