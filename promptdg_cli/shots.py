"""Which k images per class a few-shot run trains on: CoOp's draw (Dassl's), image for image.

CoOp's datasets draw their shots with Dassl's ``DatasetBase.generate_fewshot_dataset``: Python's
``random`` is seeded with the run seed (``set_random_seed(cfg.SEED)`` in ``train.py``, before the
dataset is built), a split's items are grouped by label in the order the split lists them
(``split_dataset_by_label``: a dict, so labels in the order of their first item), and each label
with at least k items gives ``random.sample(items, k)``, a label with fewer gives all its items. The
train split is drawn with k first, then, from the same generator, the val split with min(k, 4);
ImageNet, whose val split is its test set, draws train only. A run keeps the items in draw order.

Where a dataset folder holds CoOp's ``split_fewshot/shot_{k}-seed_{s}.pkl`` (written by the official
code the first time it drew), CoOp reads the draw from that file instead.
:func:`read_official_draw` reads it without executing anything from it: a restricted unpickler that
maps Dassl's ``Datum`` to plain data and refuses every other class. Its absolute image paths (of the
machine that wrote it) are matched to this dataset's images by their trailing path components.

The same draw serves ``shots=k`` on domain datasets (DG data): the sources' training part in its
order, then their validation part with min(k, 4).
"""
from __future__ import annotations

import pickle
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from .errors import DatasetNotFound

if TYPE_CHECKING:
    from .data import Features

VAL_SHOTS = 4  # CoOp's validation draw: min(k, 4) images per class
DASSL = "dassl"  # the sampler of a draw made here, by Dassl's algorithm
DATUM = ("dassl.data.datasets.base_dataset", "Datum")  # the only class an official draw file may name


@dataclass
class Draw:
    """Positions (into the split's listing) of the drawn train and val images, in draw order."""

    train: List[int]
    val: Optional[List[int]]
    sampler: str  # "dassl", or the official file it was read from ("split_fewshot/shot_16-seed_1.pkl")
    short: List[str] = field(default_factory=list)  # "label (count)" of labels with fewer than k images


def _by_label(labels: Sequence[int]) -> dict:
    """Positions of each label's items, labels in the order of their first item (Dassl's tracker)."""
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return groups


def draw_split(labels: Sequence[int], k: int, rng: random.Random, short: Optional[list] = None) -> List[int]:
    """One split's draw: for each label in first-appearance order, ``rng.sample`` of k of its
    positions (all of them where it has fewer than k)."""
    out: List[int] = []
    for label, items in _by_label(labels).items():
        if len(items) >= k:
            out += rng.sample(items, k)
        else:
            out += items
            if short is not None:
                short.append(f"{label} ({len(items)})")
    return out


def dassl_draw(train_labels: Sequence[int], val_labels: Optional[Sequence[int]], k: int, seed: int) -> Draw:
    """CoOp's draw of a run with ``seed``: train with k, then val (None: no val split) with min(k, 4)."""
    if int(k) < 1:
        raise ValueError(f"shots={k}: the number of images per class must be >= 1")
    rng = random.Random(int(seed))
    short: List[str] = []  # the classes with fewer than k images, as "label (count)"
    train = draw_split(train_labels, int(k), rng, short)
    val = None if val_labels is None else draw_split(val_labels, min(int(k), VAL_SHOTS), rng)
    if short:
        warnings.warn(f"{len(short)} class(es) have fewer than {k} training images; all their images are used: "
                      f"label (count) {', '.join(short[:10])}{' ...' if len(short) > 10 else ''}", stacklevel=2)
    return Draw(train, val, DASSL, short)


def drawn_record(draw: Draw, train: Features, val: Optional[Features], root) -> dict:
    """The drawn images as a run records them: paths relative to the dataset folder, in draw order."""
    def rel(paths):
        return [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in paths]

    return {"sampler": draw.sampler, "train": rel(train.paths), "val": None if val is None else rel(val.paths)}


# --------------------------------------------------------------------- the official draw files
def official_draw_file(dataset_root: Path, k: int, seed: int) -> Path:
    """Where CoOp keeps the draw of (k, seed): ``<dataset folder>/split_fewshot/shot_{k}-seed_{seed}.pkl``."""
    return Path(dataset_root) / "split_fewshot" / f"shot_{int(k)}-seed_{int(seed)}.pkl"


class DrawFileError(DatasetNotFound):
    """An official draw file that cannot be used (another class inside, an image not in the split)."""


class _Datum:
    """Dassl's ``Datum`` as plain data (``_impath``, ``_label``, ``_domain``, ``_classname``)."""

    _impath: str  # (set by the file's state, checked where read)
    _label: int

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a Datum's state is not a dict")
        self.__dict__.update(state)


class _DrawUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) == DATUM:
            return _Datum
        raise DrawFileError(
            f"{self.path}: an official few-shot draw file holds Dassl's Datum objects only; this one names "
            f"{module}.{name}, which is not loaded (nothing in a draw file is executed). Delete the file to "
            f"let promptdg draw the shots itself (the same algorithm)."
        )


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _DrawUnpickler(f, path).load()
    except DrawFileError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise DrawFileError(f"{path}: not a readable few-shot draw file ({type(e).__name__}: {e}). Delete it to let "
                            f"promptdg draw the shots itself (the same algorithm).") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise DrawFileError(
            f"{path}: expected {{'train': [Datum, ...], 'val': [...]}} (CoOp's format), found {type(data).__name__}"
        )
    return data


Listing = Tuple[Sequence[Path], Sequence[int]]  # a split's (paths, labels)


def _positions(items: list, paths: Sequence[Path], labels: Sequence[int], path: Path, part: str) -> List[int]:
    """Each Datum's position in this dataset's listing of the split: the one image whose trailing path
    components match the Datum's path (an absolute path on the machine that wrote the file)."""
    by_name: dict = {}
    for i, p in enumerate(paths):
        by_name.setdefault(Path(p).name, []).append(i)
    out = []
    for d in items:
        if not isinstance(d, _Datum) or not isinstance(getattr(d, "_impath", None), str):
            raise DrawFileError(f"{path}: {part} holds {type(d).__name__}, not Dassl's Datum")
        parts = Path(d._impath).parts
        cands, n = by_name.get(parts[-1], []), 1
        while len(cands) > 1 and n < len(parts):  # same file name: compare one more folder
            n += 1
            cands = [i for i in cands if Path(paths[i]).parts[-n:] == parts[-n:]]
        if len(cands) != 1:
            raise DrawFileError(f"{path}: the {part} image {d._impath} is not in this dataset's {part} split "
                                f"(matched by its trailing path components); the file belongs to another copy or split")
        hit = cands[0]
        if int(getattr(d, "_label", -1)) != int(labels[hit]):
            raise DrawFileError(
                f"{path}: the {part} image {d._impath} has label {d._label} in the file and {labels[hit]} here"
            )
        out.append(hit)
    return out


def read_official_draw(path: Path, train: Listing, val: Optional[Listing], root: Path) -> Draw:
    """The draw stored in CoOp's file ``path``, as positions into this dataset's ``train`` and ``val``
    listings (each ``(paths, labels)``; ``val`` None: a dataset without its own val split)."""
    data = _load(path)
    t = _positions(data["train"], *train, path, "train")
    v = None
    if val is not None:
        if not isinstance(data.get("val"), list):
            raise DrawFileError(f"{path}: has no 'val' list, which this dataset's draw needs")
        v = _positions(data["val"], *val, path, "val")
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    return Draw(t, v, str(rel))
