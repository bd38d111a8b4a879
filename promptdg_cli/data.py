"""Datasets on disk, image loading, and the cache of frozen image features.

Layout (DomainBed's): ``<root>/<folder>/<domain>/<class>/<image>``. A dataset config names the
exact domain folders and maps each class folder to the human name used in prompts. Which images a
run trains and tests on is the business of ``protocols.py``, not of this module.

Feature cache: a frozen image encoder is run once per (weights, dataset, domain, file list,
transform); the features of a whole domain folder are stored as safetensors under
``<cache_root>/features`` and every method and run reuses them. The key hashes the file list
with sizes and modification times, so adding, removing or replacing an image invalidates it.
Jobs that need the same missing file at once compute it once (``compute_once.compute_once``), and
an unreadable file is computed again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import devices, plugins
from .compute_once import compute_once
from .errors import DatasetNotFound

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# --------------------------------------------------------------------- the dataset on disk
def expected_layout(cfg) -> str:
    cls = list(cfg.classes)
    return (
        f"{Path(cfg.root) / cfg.folder}/\n"
        + "".join(f"    {d}/\n" for d in list(cfg.domains)[:2])
        + (f"    ... ({len(cfg.domains)} domains: {', '.join(cfg.domains)})\n" if len(cfg.domains) > 2 else "")
        + f"        {cls[0]}/\n            <image files: {', '.join(sorted(IMAGE_EXTENSIONS)[:4])}, ...>\n"
        + f"        ... ({len(cls)} class folders)"
    )


def dataset_dir(cfg) -> Path:
    """The dataset's folder, generating the demo world on first use; clear errors otherwise."""
    root = Path(os.path.expanduser(str(cfg.root))) / cfg.folder
    if cfg.generator:
        plugins.load("dataset generator", str(cfg.generator), "dataset.generator")(root, **dict(cfg.generator_args))
    if not root.is_dir():
        raise DatasetNotFound(
            f"dataset={cfg.name}: folder {root} does not exist (data root: dataset.root / $PROMPTDG_DATA).\n"
            f"Expected layout:\n{expected_layout(cfg)}\n"
            + (f"How to get it:\n{cfg.prepare.strip()}" if cfg.prepare else "")
        )
    missing = [d for d in cfg.domains if not (root / d).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetNotFound(
            f"dataset={cfg.name}: domain folder(s) {missing} missing in {root} (found: {found}).\n"
            f"Expected layout:\n{expected_layout(cfg)}"
        )
    for d in cfg.domains:
        unknown = sorted(p.name for p in (root / d).iterdir() if p.is_dir() and p.name not in cfg.classes)
        if unknown:
            raise DatasetNotFound(
                f"dataset={cfg.name}: {root / d} has class folders the config does not know: {unknown[:5]}. "
                f"Valid class folders: {list(cfg.classes)[:10]}{' ...' if len(cfg.classes) > 10 else ''}.\n"
                f"Expected layout:\n{expected_layout(cfg)}"
            )
    return root


def list_domain(cfg, domain: str) -> tuple[list[Path], list[int]]:
    """Image paths and labels of one domain, sorted (stable across machines)."""
    root = dataset_dir(cfg) / domain
    paths, labels = [], []
    for label, cls in enumerate(cfg.classes):
        folder = root / cls
        if not folder.is_dir():
            continue  # some benchmarks lack a class in a domain
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                labels.append(label)
    if not paths:
        raise DatasetNotFound(
            f"dataset={cfg.name}: domain {domain!r} ({root}) holds no images.\nExpected layout:\n{expected_layout(cfg)}"
        )
    return paths, labels


def class_names(cfg) -> list[str]:
    return [str(cfg.classes[c]) for c in cfg.classes]


# --------------------------------------------------------------------- feature cache
@dataclass
class Features:
    """Normalised image features of a set of images, with labels and domain names."""

    x: torch.Tensor  # (N, D) float32, L2-normalised
    y: torch.Tensor  # (N,) int64
    domain: List[str]
    paths: List[str]

    def subset(self, idx) -> "Features":
        idx = np.asarray(idx, dtype=np.int64)
        return Features(self.x[idx], self.y[idx], [self.domain[i] for i in idx], [self.paths[i] for i in idx])

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        return Features(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            [d for p in parts for d in p.domain],
            [q for p in parts for q in p.paths],
        )

    def __len__(self) -> int:
        return len(self.y)


def image_seed(seed: int, position: int) -> int:
    """The seed of a random transform of the image at ``position`` of a list seeded by ``seed``."""
    return int(seed) * 1_000_003 + position


class ImageFiles(torch.utils.data.Dataset):
    """Images through a transform. A random transform is seeded per image: by (seed, position) when
    ``seed`` is a number, by ``seed[position]`` when it is a list (one seed per image). An item may
    also be a draw ``(position, path, seed or None)`` that carries its own file and seed (a loader
    whose workers serve every epoch: :class:`EpochLoader`)."""

    def __init__(self, paths: Sequence[str | Path], transform, seed: Optional[int | Sequence[int]] = None):
        self.paths, self.transform, self.seed = list(paths), transform, seed

    def __len__(self):
        return len(self.paths)

    def _seed(self, i: int) -> int:
        # (a number here: an unseeded list never asks for a seed)
        return int(self.seed[i]) if isinstance(self.seed, (list, tuple)) else image_seed(cast(int, self.seed), i)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            i, path, seed = item
        else:
            i, path, seed = item, self.paths[item], None if self.seed is None else self._seed(item)
        try:
            with Image.open(path) as im:
                if seed is None:
                    return i, self.transform(im.convert("RGB"))
                with torch.random.fork_rng(devices=[]):  # never disturbs the caller's random state
                    torch.manual_seed(seed)
                    return i, self.transform(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            return i, None  # corrupt or unreadable: skipped and counted by the caller


def collate(batch):
    """Batches of ``ImageFiles`` items: (positions, images or None, unreadable positions)."""
    ok = [(i, x) for i, x in batch if x is not None]
    bad = [i for i, x in batch if x is None]
    if not ok:
        return torch.empty(0, dtype=torch.long), None, bad
    return torch.tensor([i for i, _ in ok]), torch.stack([x for _, x in ok]), bad


def image_batches(
    paths: Sequence[str | Path],
    transform,
    batch_size: int,
    num_workers: int,
    seed: Optional[int | Sequence[int]] = None,
    device: Optional[torch.device] = None,
):
    """Batches ``(positions, images, unreadable positions)`` of ``paths`` in order, loaded by
    ``num_workers`` processes (none for a handful of batches, where starting them costs more), into
    pinned memory when they go to a GPU (``device``; copy them with ``non_blocking=True``)."""
    return torch.utils.data.DataLoader(
        ImageFiles(paths, transform, seed),
        batch_size=batch_size,
        num_workers=num_workers if len(paths) > 4 * batch_size else 0,
        collate_fn=collate,
        pin_memory=device is not None and torch.device(device).type == "cuda",
    )


def image_loader(
    paths: Sequence[str | Path],
    transform,
    batches: List[List[int]],
    num_workers: int,
    seed: Optional[int] = None,
    device: Optional[torch.device] = None,
    pool: Optional["EpochLoader"] = None,
):
    """The images of ``batches`` (lists of positions in ``paths``), batch by batch, as
    ``(positions, images or None, unreadable positions)``; a random transform is seeded by
    (seed, position), so an image gets the same augmentation whichever process loads it. ``pool``: an
    :class:`EpochLoader` whose workers load every epoch's images (started once, not every epoch)."""
    if pool is not None:
        draws = [[(i, str(paths[i]), None if seed is None else image_seed(seed, i)) for i in b] for b in batches]
        return pool.epoch(("files", transform), lambda: ImageFiles([], transform), draws, num_workers)
    many = sum(map(len, batches)) > 4 * max((len(b) for b in batches), default=1)
    return torch.utils.data.DataLoader(ImageFiles(paths, transform, seed), batch_sampler=batches,
                                       num_workers=num_workers if many else 0, collate_fn=collate,
                                       pin_memory=device is not None and torch.device(device).type == "cuda")


class _EpochBatches:
    """A batch sampler whose batches are replaced every epoch (a DataLoader reads it at every ``iter``)."""

    def __init__(self) -> None:
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class EpochLoader:
    """One DataLoader for every epoch of a split's training: its worker processes start once and stay
    (``persistent_workers``), each epoch hands over its batches (:meth:`epoch`); another ``key`` (a new
    dataset, e.g. DomainFusion's next synthetic round) starts new ones. Batches go into pinned memory
    when ``device`` is a GPU (copy them with ``non_blocking=True``). An epoch of 4 batches or fewer is
    loaded in the main process, as starting workers would cost more."""

    def __init__(self, device: torch.device, collate_fn=collate):
        self.device, self.collate_fn = torch.device(device), collate_fn
        self.key: Optional[tuple] = None
        self.loader: Optional[torch.utils.data.DataLoader] = None
        self.sampler = _EpochBatches()

    def epoch(self, key, dataset, batches: list, num_workers: int):
        """An iterator over ``batches`` (lists of dataset items); ``dataset()`` builds the dataset when
        ``key`` is new."""
        workers = int(num_workers) if len(batches) > 4 else 0
        if self.loader is None or (key, workers) != self.key:
            self.sampler = _EpochBatches()
            self.loader = torch.utils.data.DataLoader(
                dataset(),
                batch_sampler=self.sampler,
                num_workers=workers,
                collate_fn=self.collate_fn,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
            )
            self.key = (key, workers)
        self.sampler.batches = list(batches)
        return iter(self.loader)


class FeatureCache:
    """Features of frozen image encoders on disk, computed once and shared by all runs."""

    def __init__(self, cache_root: str | Path, batch_size: int = 128, num_workers: int = 2):
        self.dir = Path(os.path.expanduser(str(cache_root))) / "features"
        self.batch_size, self.num_workers = batch_size, num_workers
        self.hits = self.misses = 0
        self.views = {"computed": 0, "read": 0}  # augmented views (view_features): encoded here, or read from the cache
        self.recovered: list = []  # unreadable cache files computed again (recovery events)
        # the data as it was used, for the run's record: image files skipped as unreadable and class
        # folders with no image, by "<dataset>/<domain or split>"
        self.unreadable: Dict[str, int] = {}
        self.empty_classes: Dict[str, List[str]] = {}

    @staticmethod
    def key(backbone_identity: dict, dataset: str, domain: str, paths: Sequence[Path], transform) -> str:
        files = hashlib.sha1()
        for p in paths:
            st = p.stat()
            files.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        blob = json.dumps(
            {
                "backbone": backbone_identity,
                "dataset": dataset,
                "domain": domain,
                "files": files.hexdigest(),
                "transform": repr(transform),
            },
            sort_keys=True,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def domain_features(self, backbone, dataset_cfg, domain: str) -> Features:
        """Features of a whole domain (its images as the backbone's preprocessing shows them)."""
        paths, labels = list_domain(dataset_cfg, domain)
        empty = [name for i, name in enumerate(dataset_cfg.classes) if i not in set(labels)]
        if empty:  # (some benchmarks lack a class in a domain: recorded, not an error)
            self.empty_classes[f"{dataset_cfg.name}/{domain}"] = empty
        return self.list_features(backbone, dataset_cfg.name, domain, paths, labels)

    def list_features(
        self, backbone, dataset: str, name: str, paths: Sequence[Path], labels: Sequence[int]
    ) -> Features:
        """Features of a list of images (a domain folder, or a split of a split-file dataset)."""
        paths = list(paths)
        transform = backbone.preprocess
        file = (
            self.dir / dataset / f"{name}-{self.key(backbone.identity(), dataset, name, paths, transform)}.safetensors"
        )
        what = f"{dataset}/{name}"
        meta = {"model": backbone.model_name, "weights": backbone.weights_id, "domain": name}
        # one job computes a missing (or unreadable) file, the others wait for it (compute_once.py)
        t, computed = compute_once(file, lambda: self._encode_keep(backbone, paths, what, transform),
                                   lambda t, f: save_file(t, str(f), metadata=meta), lambda f: load_file(str(f)),
                                   f"the features of {what}", events=self.recovered)
        self.misses += computed
        self.hits += not computed
        keep = t["index"].tolist()
        if len(keep) < len(paths):
            self.unreadable[f"{dataset}/{name}"] = len(paths) - len(keep)
        return Features(
            t["x"].float(),
            torch.tensor([labels[i] for i in keep], dtype=torch.long),
            [name] * len(keep),
            [str(paths[i]) for i in keep],
        )

    def _encode_keep(self, backbone, paths, what, transform, seed=None) -> dict:
        keep, x = self._encode(backbone, paths, what, transform, seed=seed)
        return {"x": x, "index": torch.tensor(keep, dtype=torch.long)}

    def view_features(self, backbone, dataset: str, name: str, paths: Sequence[str], seeds: Sequence[int], tag: str,
                      store: bool = True) -> torch.Tensor:
        """(N, D) features of one augmented view of every image (``views.py``): image i through
        :func:`augmented_transform` seeded by ``seeds[i]``. ``tag`` names the view in the cache key;
        ``store``: kept in the cache (and computed once by jobs that ask at once), else computed here."""
        files = [Path(p) for p in paths]
        transform = augmented_transform(backbone.preprocess)
        what = f"{dataset}/{name} (augmented view {tag})"

        def compute():
            t = self._encode_keep(backbone, files, what, transform, seed=list(seeds))
            if len(t["index"]) < len(files):
                bad = sorted(set(range(len(files))) - set(t["index"].tolist()))
                raise DatasetNotFound(f"{what}: {len(bad)} image(s) can no longer be read, e.g. {files[bad[0]]}")
            return t

        if not store:
            self.views["computed"] += 1
            return compute()["x"]
        key = hashlib.sha1(
            f"{self.key(backbone.identity(), dataset, name, files, transform)}-{tag}".encode()
        ).hexdigest()[:16]
        file = self.dir / dataset / "views" / f"{name}-{key}.safetensors"
        meta = {"model": backbone.model_name, "weights": backbone.weights_id, "domain": name, "view": tag}
        t, computed = compute_once(
            file,
            compute,
            lambda t, f: save_file(t, str(f), metadata=meta),
            lambda f: load_file(str(f)),
            f"the features of {what}",
            events=self.recovered,
        )
        self.views["computed" if computed else "read"] += 1
        return t["x"].float()

    @torch.no_grad()
    def _encode(
        self, backbone, paths: list[Path], what: str, transform=None, seed=None
    ) -> tuple[list[int], torch.Tensor]:
        device = backbone.device
        loader = image_batches(
            paths, transform or backbone.preprocess, self.batch_size, self.num_workers, seed, device=device
        )
        keep, feats, bad = [], [], []
        precision = getattr(backbone, "precision", "fp32")  # backbone.precision: bf16/fp16 autocast on CUDA
        for idx, images, skipped in tqdm(loader, desc=f"encoding {what}", unit="batch", leave=False):
            bad += skipped
            if images is None:
                continue
            with devices.autocast(device, precision):
                f = backbone.encode_image(images.to(device, non_blocking=True), normalize=True)
            keep += idx.tolist()
            feats.append(f.float().cpu())
        if bad:
            warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s), e.g. {paths[bad[0]]}", stacklevel=2)
        if not feats:
            raise DatasetNotFound(f"{what}: none of the {len(paths)} image files could be read")
        return keep, torch.cat(feats)


def augmented_transform(preprocess):
    """The training augmentation of Dassl's configs (random resized crop, random flip) in front of
    the backbone's own tensor conversion and normalisation."""
    from torchvision import transforms as T

    steps = list(preprocess.transforms)
    crop = next(i for i, t in enumerate(steps) if isinstance(t, T.CenterCrop))
    size = steps[crop].size
    return T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            *steps[crop + 1 :],
        ]
    )
