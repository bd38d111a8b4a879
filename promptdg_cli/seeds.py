"""Every random stream of a run, by name, and the seed it starts from.

A run draws from several independent streams: the loop's order of each epoch, DAPT's augmentation of
each epoch's shots and of its prototypes, PromptStyler's initial style vectors, DomainFusion's
synthetic set, its augmentation rounds and each img2img batch, DomainBed's distilled draws. Each is
seeded from the run seed and the keys that make it repeatable (the epoch, the style, the round), so
a resumed run, every rank of a torchrun job and an uninterrupted run draw the same numbers. The
formulas are the ones runs have always used (a change would change every result); methods name the
stream (``RunEnv.rng("dapt-augmentation", epoch)``), never the arithmetic.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Union, cast

import numpy as np
import torch

Seed = Union[int, List[int]]

STREAMS: Dict[str, Callable[..., Seed]] = {
    # the training loop's batches of epoch e (training.TrainContext.train)
    "epoch-order": lambda s, epoch: s * 100003 + epoch,
    # DAPT: each epoch's random crops and flips of its shots (seeded per image position on top), and
    # the one view of every shot its prototypes are computed from
    "dapt-augmentation": lambda s, epoch: s * 10007 + epoch,
    "dapt-prototypes": lambda s: s * 10007 + 99991,
    # PromptStyler: style i's initial vector N(0, 0.02²)
    "promptstyler-style": lambda s, i: s * 1_000_003 + i,
    # DomainFusion: which source images get a synthetic copy (a NumPy generator), the inputs of
    # augmentation round r, and one img2img batch of a round (by its first image)
    "domainfusion-synthetic-set": lambda s: [s, 7],
    "domainfusion-round": lambda s, r: s * 1009 + r,
    "domainfusion-img2img-batch": lambda round_seed, first: round_seed * 1_000_003 + first,
    # DomainBed's step: a distilled draw's timestep and noise, from the draw's own seed
    "domainfusion-distilled-draw": lambda draw_seed: draw_seed ^ 0x5EED,
}


def seed(stream: str, run_seed: int, *keys: int) -> Seed:
    """The seed ``stream`` starts from for ``run_seed`` and ``keys``."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; streams: {', '.join(STREAMS)}")
    return STREAMS[stream](int(run_seed), *(int(k) for k in keys))


def generator(
    stream: str, run_seed: int, *keys: int, device: Optional[Union[str, torch.device]] = None
) -> torch.Generator:
    """A torch generator at the start of ``stream``."""
    # (a stream of one integer: the list seeds are NumPy's)
    return torch.Generator(device=device or "cpu").manual_seed(int(cast(int, seed(stream, run_seed, *keys))))


def numpy_generator(stream: str, run_seed: int, *keys: int) -> np.random.Generator:
    """A NumPy generator at the start of ``stream``."""
    return np.random.default_rng(seed(stream, run_seed, *keys))
