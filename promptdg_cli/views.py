"""What a frozen-encoder method (CoOp, DAPL) sees of its training images, epoch by epoch.

The official code of CoOp and DAPL loads every training image afresh whenever its loader meets it,
through Dassl's training transform (a random resized crop of scale (0.08, 1) and a random horizontal
flip, bicubic, then the backbone's normalisation), and encodes that view with the frozen image
encoder. Because the encoder is frozen and sees no gradient, the view's features can be computed
once for the whole epoch, before its steps: the same numbers the official loop computes batch by
batch. ``method.augment`` chooses what an epoch sees:

* ``official`` (the default; :class:`FreshViews`): every image's own view per epoch (and per pass,
  where the target loader restarts within an epoch), its random crop and flip drawn from a generator
  seeded by (run seed, epoch, pass, the image's path in its dataset folder), so a rerun, a resumed run,
  every run that trains on the same image at the same seed, and the same run on another machine
  or data root draw the same view. With ``augment_cache`` (default
  true) the features of a view are stored in the feature cache and shared by those runs: an
  Office-Home domain appears in 6 of the 12 UDA pairs, so a sweep encodes each view once.
* ``views`` (promptdg's cheaper protocol; :class:`KViews`): K views per image (``method.aug_views``),
  encoded once; each epoch takes one of them per image, drawn with a generator seeded by (seed, epoch).
* ``none`` (promptdg's cheapest; :class:`Plain`): the un-augmented cached features in every epoch.

Every mode answers ``epoch(e, rep) -> (N, D)`` normalised features in the order of the base list.
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import List, Optional, Protocol, Sequence

import torch

OFFICIAL, VIEWS, NONE = "official", "views", "none"
MODES = (OFFICIAL, VIEWS, NONE)


class EpochFeatures(Protocol):
    n: int

    def epoch(self, epoch: int, rep: int = 0) -> torch.Tensor:
        """(N, D) normalised features of the images as seen in ``epoch`` (``rep``: the loader's pass)."""
        ...


def image_key(path: str | Path, root: Optional[Path] = None) -> int:
    """A stable number per image, the part of a view's seed that names it: its path relative to the
    dataset folder ``root`` (the same wherever the data lies), or as given."""
    p = Path(path)
    if root is not None and p.is_relative_to(root):
        p = p.relative_to(root)
    return zlib.crc32(p.as_posix().encode())


def view_seed(seed: int, epoch: int, rep: int, key: int) -> int:
    """The seed of one image's view: a hash of (run seed, epoch, pass, image), so views never repeat
    across epochs, passes or images the way sums of small numbers could."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rep}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Plain:
    """The un-augmented features in every epoch (``augment: none``)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.n = x, len(x)

    def epoch(self, epoch: int, rep: int = 0) -> torch.Tensor:
        return self.x


class FreshViews:
    """The official augmentation: a new view of every image per (epoch, pass), encoded by the frozen
    encoder (``FeatureCache.view_features``: stored and shared when ``store``)."""

    def __init__(self, cache, backbone, dataset: str, name: str, paths: Sequence[str], seed: int, store: bool = True,
                 root: Optional[Path] = None):
        self.cache, self.backbone, self.dataset, self.name = cache, backbone, dataset, name
        self.paths, self.seed, self.store, self.n = [str(p) for p in paths], int(seed), bool(store), len(paths)
        self.keys = [image_key(p, root) for p in self.paths]
        self._last: Optional[tuple] = None  # (epoch, rep, features): the view in use

    def epoch(self, epoch: int, rep: int = 0) -> torch.Tensor:
        if self._last is None or self._last[:2] != (epoch, rep):
            seeds = [view_seed(self.seed, epoch, rep, k) for k in self.keys]
            x = self.cache.view_features(self.backbone, self.dataset, self.name, self.paths, seeds,
                                         f"seed{self.seed}-epoch{epoch}-pass{rep}", store=self.store)
            self._last = (epoch, rep, x)
        return self._last[2]


class KViews:
    """promptdg's cheaper protocol: K views per image encoded once (views -1 .. -K of
    :class:`FreshViews`), one of them per image and epoch."""

    def __init__(self, fresh: FreshViews, k: int, seed: int):
        self.fresh, self.k, self.seed, self.n = fresh, int(k), int(seed), fresh.n
        self._stack: Optional[torch.Tensor] = None

    def epoch(self, epoch: int, rep: int = 0) -> torch.Tensor:
        if self._stack is None:
            self._stack = torch.stack([self.fresh.epoch(-1 - v) for v in range(self.k)])  # (K, N, D)
        g = torch.Generator().manual_seed(view_seed(self.seed, epoch, rep, 0))
        pick = torch.randint(self.k, (self.n,), generator=g)
        return self._stack[pick, torch.arange(self.n)]


class ConcatViews:
    """Several lists' epoch features one after another (the source domains of a split)."""

    def __init__(self, parts: List[EpochFeatures]):
        self.parts, self.n = parts, sum(p.n for p in parts)

    def epoch(self, epoch: int, rep: int = 0) -> torch.Tensor:
        return (
            torch.cat([p.epoch(epoch, rep) for p in self.parts])
            if len(self.parts) > 1
            else self.parts[0].epoch(epoch, rep)
        )


def epoch_features(mode: str, base, cache, backbone, dataset: str, name: str, seed: int, k: int = 0,
                   store: bool = True, root: Optional[Path] = None) -> EpochFeatures:
    """The epoch-by-epoch features of ``base`` (:class:`~promptdg_cli.data.Features`) for ``mode``;
    ``root``: the dataset folder its paths lie in."""
    if mode == NONE:
        return Plain(base.x)
    fresh = FreshViews(cache, backbone, dataset, name, base.paths, seed, store, root)
    return fresh if mode == OFFICIAL else KViews(fresh, k, seed)


def concat_passes(views: EpochFeatures, epoch: int, passes: int) -> torch.Tensor:
    """The features of ``passes`` successive passes of one epoch, stacked: (passes * N, D); row
    p * N + i is image i in pass p (DAPL's target loader restarts within an epoch)."""
    return torch.cat([views.epoch(epoch, p) for p in range(passes)]) if passes > 1 else views.epoch(epoch, 0)


__all__: List[str] = ["MODES", "OFFICIAL", "VIEWS", "NONE", "EpochFeatures", "Plain", "FreshViews", "KViews",
                      "ConcatViews", "epoch_features", "concat_passes", "image_key", "view_seed"]
