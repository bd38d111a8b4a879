"""The method interface: what the runner and the training loop ask of every method.

A method is built from its config, the frozen backbone, the class names, the device and the run's
:class:`RunEnv`. ``fit`` trains it on one split's :class:`~promptdg_cli.protocols.TrainData` (cached
image features, or no images at all); ``logits`` scores normalised image features. A method that
trains by gradient steps supplies the hooks below and lets ``ctx.train(self)`` run the loop
(``promptdg_cli/training.py``): the loop owns seeding, sharding, checkpoints, preemption, model
selection and metrics, so a method file holds its paper only (prompts, losses, the step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch

from ..schema import MethodConfig


@dataclass
class RunEnv:
    """What a method may know of its run besides its config."""

    seed: int = 0
    num_workers: int = 0  # image-loading workers, for methods that read images
    cache_root: Optional[str] = None  # the run's cache root (methods that build cached models: the demo LDM)
    domain_names: Dict[str, str] = field(default_factory=dict)  # domain folder -> the words prompts use
    precision: str = "fp32"  # backbone.precision: autocast of the frozen encoders and the prompt path on CUDA
    trial_seed: int = 0  # DomainBed's trial_seed (the DG split; with hparams_seed, its random hyper-parameters)
    dataset: str = ""  # the dataset config's name


class Method:
    Config: ClassVar[Type] = MethodConfig  # the config schema (built-ins: promptdg_cli/schema.py)
    trains: ClassVar[bool] = True  # False: evaluation only (zero-shot)
    needs_vit: ClassVar[bool] = False  # True: a ResNet backbone is a config error
    extras: ClassVar[Tuple[str, ...]] = ()  # optional extras it needs (promptdg_cli/extras.py): checked before a run starts
    backbone_kinds: ClassVar[tuple] = ("clip",)  # the backbone kinds it runs on (clip, classifier)
    # The protocol the method always runs: None (the dataset's), "uda" (labelled sources, unlabelled
    # target in training) or "source_free" (no images in training; tested on every domain).
    protocol: ClassVar[Optional[str]] = None

    def __init__(self, cfg, backbone, classnames: List[str], device: torch.device, env: Optional[RunEnv] = None):
        self.cfg, self.backbone, self.classnames, self.device = cfg, backbone, list(classnames), device
        self.env = env or RunEnv()

    # ----------------------------------------------------------------- training and inference
    def fit(self, data, ctx) -> None:
        """Train on ``data`` (source only; the target's labels never reach a method). Default: the loop."""
        ctx.train(self)

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

    # ----------------------------------------------------------------- hooks of the training loop
    def parameters_to_train(self) -> List[torch.nn.Parameter]:
        raise NotImplementedError

    def optimizer(self, params) -> torch.optim.Optimizer:
        raise NotImplementedError

    def epoch_batches(self, epoch: int, g: torch.Generator) -> list:
        """The epoch's global batches (index tensors, or tuples of them), drawn from ``g``."""
        raise NotImplementedError

    def load(self, epoch: int, local_batches: list):
        """What each step needs of this rank's part of its batch; the parts themselves by default."""
        return iter(local_batches)

    def batch_loss(self, item, batch, info) -> list:
        """The step's loss as ``training.Term`` s."""
        raise NotImplementedError

    def rounds(self) -> int:
        """Rounds of the loop, each ended by validation and a checkpoint: epochs, or DomainBed's
        evaluation periods."""
        return int(self.cfg.epochs)

    def lr(self, epoch: int, step: int, steps: int) -> Optional[float]:
        """The learning rate of this step (None: leave the optimiser's)."""
        return None

    def validate(self) -> Optional[float]:
        """The validation accuracy that selects the epoch (None: keep the last epoch)."""
        return None

    def on_epoch(self, epoch: int, ctx) -> None:
        """A hook at the start of every epoch (DomainFusion's augmentation rounds)."""

    def extra_state(self) -> Any:
        """Method state beyond the parameters that a mid-training checkpoint must keep."""
        return None

    def load_extra_state(self, state: Any) -> None:
        pass
