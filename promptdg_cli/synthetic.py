"""Generated image sets on disk: the rounds that DomainFusion's training and ``promptdg generate`` write.

A round turns a list of input images into as many output PNGs, batch by batch, through a method's
``augment_batch`` (DomainFusion's fused img2img candidates). It is resumable: a batch whose outputs
are all there is skipped, an output left unreadable by an interrupted run (a half-written PNG from
before writes were atomic, a damaged file system) is generated again and returned as a recovery
event; under torchrun the batches are shared out over the ranks (``TrainContext.files``). Each
batch has its own generator (``seeds``: the round's seed and its first image), so a resumed or
shared-out round writes the same images as an uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, cast

import torch
from PIL import Image

from . import seeds
from .files import image_error, recovery_event, write_atomic


def ldm_pixels(paths: Sequence[str], size: int) -> torch.Tensor:
    """Images as an LDM's [0, 1] pixels, (B, 3, size, size): bicubic resize of the short side, centre crop."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()])
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(tf(im.convert("RGB")))
    return torch.stack(out)


def save_png(x01: torch.Tensor, path: Path) -> None:
    """One image (3, H, W) in [0, 1] as an 8-bit PNG, written atomically."""
    arr = x01.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    write_atomic(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def round_seed(run_seed: int, r: int) -> int:
    """The seed of augmentation round ``r`` (its batches derive theirs from it)."""
    return int(cast(int, seeds.seed("domainfusion-round", run_seed, r)))  # (a stream of one integer)


def round_outputs(folder: Path, r: int, n: int) -> List[Path]:
    """The files of round ``r`` of a synthetic set of ``n`` images."""
    return [Path(folder) / f"round{r}" / f"{k:06d}.png" for k in range(n)]


def write_round(augment_batch: Callable[[List[str], List[int], torch.Generator], torch.Tensor], inputs: Sequence[str],
                labels: Sequence[int], outputs: Sequence[Path], seed: int, batch_size: int, desc: str, produce,
                device: Optional[torch.device] = None) -> list:
    """``inputs`` turned into ``outputs`` by ``augment_batch(paths, labels, generator) -> (B, 3, H, W)``
    in [0, 1], batch by batch through ``produce`` (``TrainContext.files``, or ``training.make_files``
    outside training); returns the recovery events of outputs that were there but did not decode."""
    outputs = [Path(o) for o in outputs]
    broken = {o: err for o in outputs if o.is_file() and (err := image_error(o))}
    events = [recovery_event(o, err, "generated again") for o, err in broken.items()]

    def make(idx: List[int]) -> None:
        g = seeds.generator("domainfusion-img2img-batch", seed, idx[0], device=device)
        images = augment_batch([str(inputs[i]) for i in idx], [int(labels[i]) for i in idx], g)
        for j, i in enumerate(idx):
            save_png(images[j], outputs[i])

    produce(outputs, make, batch_size, desc, lambda o: o.is_file() and o not in broken)
    return events
