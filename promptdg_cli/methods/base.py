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

from .. import seeds
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

    def rng(self, stream: str, *keys: int, device=None) -> torch.Generator:
        """A torch generator at the start of the named random stream (``seeds.py``) for this run."""
        return seeds.generator(stream, self.seed, *keys, device=device)

    def seed_for(self, stream: str, *keys: int):
        """The seed the named random stream starts from for this run (``seeds.py``)."""
        return seeds.seed(stream, self.seed, *keys)

    def numpy_rng(self, stream: str, *keys: int):
        """A NumPy generator at the start of the named random stream (``seeds.py``) for this run."""
        return seeds.numpy_generator(stream, self.seed, *keys)


class Method:
    Config: ClassVar[Type] = MethodConfig  # the config schema (built-ins: promptdg_cli/schema.py)
    trains: ClassVar[bool] = True  # False: evaluation only (zero-shot)
    needs_vit: ClassVar[bool] = False  # True: a ResNet backbone is a config error
    # optional extras it needs (promptdg_cli/extras.py): checked before a run starts
    extras: ClassVar[Tuple[str, ...]] = ()
    backbone_kinds: ClassVar[tuple] = ("clip",)  # the backbone kinds it runs on (clip, classifier)
    # The protocol the method always runs: None (the dataset's), "uda" (labelled sources, unlabelled
    # target in training) or "source_free" (no images in training; tested on every domain).
    protocol: ClassVar[Optional[str]] = None
    generates: ClassVar[bool] = False  # True: it writes generated image sets (write_round; promptdg generate)
    # the names of the Terms batch_loss returns (metrics.jsonl's columns)
    loss_terms: ClassVar[Tuple[str, ...]] = ("loss",)

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

    def features_for(self, feats):
        """The features a test set is scored on: the cached ones, or the method's own encoding of its
        images (a method that changes the image encoder: DAPT's visual prompts, a fine-tuned one)."""
        return feats

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

    def load(self, epoch: int, batches: list):
        """What each step needs of its batch (images loaded, features looked up): an iterator with one
        item per batch; the batches themselves by default."""
        return iter(batches)

    def batch_loss(self, item, info) -> list:
        """The step's loss as ``training.Term`` s (names from ``loss_terms``), from ``load``'s item."""
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

    # ----------------------------------------------------------------- methods that generate images
    def generator_name(self) -> Optional[str]:
        """What generates the images (``promptdg generate`` records it)."""
        return None

    def write_round(self, inputs, labels, outputs, seed: int, desc: str, produce) -> list:
        """One round of generation: image files ``inputs`` into ``outputs`` (``synthetic.write_round``)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate images")
