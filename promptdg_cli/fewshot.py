"""The few-shot protocol of CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022): its eleven recognition benchmarks, ImageNet's variants, and k-shot sampling.

A dataset config with ``protocol: fewshot`` says how its fixed train/val/test splits are stored
(``split_format``; the fields are documented in :class:`promptdg_cli.schema.DatasetConfig`), in the
layout of CoOp's DATASETS.md under ``<root>/<folder>``:

* ``json``: CoOp's split file ``{"train": [[relpath, label, classname], ...], "val": [...],
  "test": [...]}``, image paths relative to ``image_dir`` (Caltech101, OxfordPets, ...). The class
  names are the file's third field (CoOp's cleaned names).
* ``wnid_folders``: ``<split folder>/<wnid>/<img>`` (ImageNet, -Sketch, -A, -R). Labels are the line
  index of the wnid in ImageNet's ``classnames.txt`` (``"<wnid> <class name>"`` lines), so a
  200-class variant keeps ImageNet's 1000-class labels; :func:`class_subset` says which it covers.
* ``index_folders``: ``<split folder>/<label index>/<img>`` (ImageNet-V2), names from classnames.txt.
* ``txt``: FGVC-Aircraft's ``images_variant_<split>.txt`` (``"<image id> <variant>"`` lines, images
  ``images/<image id>.jpg``) with ``variants.txt`` giving the label order.

:func:`few_shot_splits` gives a run's data: k images per class of the train split and min(k, 4) of
the val split, drawn as CoOp draws them (``shots.py``: Dassl's algorithm, or CoOp's own draw file
when the dataset folder holds it), and the whole test split. A dataset whose val split is its test
split (ImageNet in CoOp's layout) has no validation data: nothing is drawn from it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .data import IMAGE_EXTENSIONS
from .errors import ConfigError, DatasetNotFound
from .shots import Draw, dassl_draw, official_draw_file, read_official_draw

PROTOCOL = "fewshot"
FORMATS = ("json", "wnid_folders", "index_folders", "txt")
JSON_SPLITS = ("train", "val", "test")
TXT_IMAGE_SUFFIX = ".jpg"  # FGVC-Aircraft's list files name images without their extension

Listing = Tuple[List[Path], List[int], List[str]]  # paths, labels, class names in label order


# --------------------------------------------------------------------- where things are
def dataset_root(cfg) -> Path:
    """``<root>/<folder>``: the dataset's folder."""
    return Path(os.path.expanduser(str(cfg.root))) / cfg.folder


def _data_root(cfg) -> Path:
    return Path(os.path.expanduser(str(cfg.root)))


def expected_layout(cfg) -> str:
    """The folder tree a config expects, in CoOp's DATASETS.md layout."""
    top = f"{dataset_root(cfg)}/\n"
    fmt = cfg.split_format
    if fmt == "json":
        images = f"{cfg.image_dir}/<relpath>" if cfg.image_dir else "<relpath>"
        return top + (
            f"    {cfg.split_file}    {{\"train\": [[relpath, label, classname], ...], "
            f"\"val\": [...], \"test\": [...]}}\n"
            f"    {images}    (every image the split file lists)"
        )
    if fmt == "txt":
        lists = "".join(f"    {f}    lines \"<image id> <class name>\"\n" for f in cfg.split_paths.values())
        return top + lists + f"    {cfg.image_dir}/<image id>{TXT_IMAGE_SUFFIX}\n" + (
            f"{_data_root(cfg)}/{cfg.classnames_file}    one class name a line, in label order"
        )
    child = "<wnid, e.g. n01440764>" if fmt == "wnid_folders" else "<class index 0, 1, ..., 999>"
    folders = "".join(f"    {p}/    ({s})\n        {child}/<image files>\n" for s, p in cfg.split_paths.items())
    return (
        top
        + folders
        + f"{_data_root(cfg)}/{cfg.classnames_file}    lines \"<wnid> <class name>\" (CoOp's classnames.txt)"
    )


def _not_found(cfg, key: str, value, path: Path, what: str) -> DatasetNotFound:
    """The error for a missing file or folder: names the key, the path, the layout and how to get it."""
    return DatasetNotFound(
        f"dataset={cfg.name}: {what} {path} does not exist (dataset.{key}={value!r}; "
        f"data root: dataset.root / $PROMPTDG_DATA).\n"
        f"Expected layout:\n{expected_layout(cfg)}\n"
        + (f"How to get it:\n{cfg.prepare.strip()}" if cfg.prepare else "")
    )


def _bad_data(cfg, msg: str) -> DatasetNotFound:
    return DatasetNotFound(f"dataset={cfg.name}: {msg}\nExpected layout:\n{expected_layout(cfg)}")


def _check_config(cfg) -> None:
    if cfg.protocol != PROTOCOL:
        raise ConfigError(
            f"dataset={cfg.name} has protocol={cfg.protocol!r}; few-shot splits need protocol={PROTOCOL!r}"
        )
    if cfg.split_format not in FORMATS:
        raise ConfigError(
            f"dataset.split_format={cfg.split_format!r} (dataset={cfg.name}) is not valid. Valid: {', '.join(FORMATS)}"
        )


def available_splits(cfg) -> List[str]:
    """The split names a dataset has (a test-only ImageNet variant has only ``test``)."""
    _check_config(cfg)
    return list(JSON_SPLITS) if cfg.split_format == "json" else list(cfg.split_paths)


def _split_key(cfg, split: str) -> str:
    """The value of ``split_paths[split]``, or a ConfigError listing the splits there are."""
    if split not in cfg.split_paths:
        raise ConfigError(
            f"dataset={cfg.name} has no {split!r} split "
            f"(dataset.split_paths has: {', '.join(cfg.split_paths) or 'none'})"
            + (
                "; it is a test-only set: train on another dataset and test on it"
                if list(cfg.split_paths) == ["test"]
                else ""
            )
        )
    return str(cfg.split_paths[split])


# --------------------------------------------------------------------- class names
def read_wnid_classnames(cfg) -> Dict[str, str]:
    """wnid -> class name, in label order, from ``classnames_file`` ("<wnid> <class name>" lines)."""
    lines = _classnames_lines(cfg)
    out = {}
    for line in lines:
        wnid, _, name = line.partition(" ")
        out[wnid] = name.strip()
    return out


def _classnames_lines(cfg) -> List[str]:
    if not cfg.classnames_file:
        raise ConfigError(f"dataset={cfg.name}: split_format={cfg.split_format} needs dataset.classnames_file")
    path = _data_root(cfg) / cfg.classnames_file
    if not path.is_file():
        raise _not_found(cfg, "classnames_file", cfg.classnames_file, path, "class-name file")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _folder_labels(cfg, split: str) -> Dict[str, int]:
    """Class folder name -> label of one split of a ``*_folders`` dataset, in label order."""
    key = _split_key(cfg, split)
    folder = dataset_root(cfg) / key
    if not folder.is_dir():
        raise _not_found(cfg, f"split_paths.{split}", key, folder, f"{split} image folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if cfg.split_format == "wnid_folders":
        index = {w: i for i, w in enumerate(read_wnid_classnames(cfg))}
        valid = set(cfg.wnids or index) & set(index)
        unknown = [n for n in names if n not in valid]
        if unknown:
            where = "dataset.wnids" if cfg.wnids else str(cfg.classnames_file)
            raise _bad_data(cfg, f"{folder} has folders that are not wnids of {where}: {unknown[:5]}")
        labels = {n: index[n] for n in names}
    else:
        n_classes = len(_classnames_lines(cfg))
        bad = [n for n in names if not n.isdigit() or int(n) >= n_classes]
        if bad:
            raise _bad_data(cfg, f"{folder} has folders that are not class indices 0..{n_classes - 1}: {bad[:5]}")
        labels = {n: int(n) for n in names}
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


# --------------------------------------------------------------------- reading one split
def read_split(cfg, split: str) -> Listing:
    """``(paths, labels, classnames)`` of one split (train | val | test) of a few-shot dataset.

    ``classnames`` holds every class of the dataset in label order (ImageNet variants: all 1000).
    A missing split file, list or image folder raises :class:`DatasetNotFound` naming the config
    key and printing the expected layout and the config's ``prepare`` text.
    """
    _check_config(cfg)
    reader = {"json": _read_json, "wnid_folders": _read_folders, "index_folders": _read_folders, "txt": _read_txt}
    paths, labels, names = reader[cfg.split_format](cfg, split)
    if not paths:
        raise _bad_data(cfg, f"the {split!r} split holds no images")
    return paths, labels, names


def _image_dir(cfg) -> Path:
    folder = dataset_root(cfg) / cfg.image_dir
    if not folder.is_dir():
        raise _not_found(cfg, "image_dir", cfg.image_dir, folder, "image folder")
    return folder


def _check_first_image(cfg, paths: Sequence[Path]) -> None:
    """The split's first image exists (a cheap check that image_dir is the folder the paths are under)."""
    if paths and not paths[0].is_file():
        raise _not_found(cfg, "image_dir", cfg.image_dir, paths[0], "image")


def _load_json(cfg) -> dict:
    if not cfg.split_file:
        raise ConfigError(f"dataset={cfg.name}: split_format=json needs dataset.split_file")
    path = dataset_root(cfg) / cfg.split_file
    if not path.is_file():
        raise _not_found(cfg, "split_file", cfg.split_file, path, "split file")
    with open(path) as f:
        data = json.load(f)
    missing = [s for s in JSON_SPLITS if s not in data]
    if missing:
        raise _bad_data(cfg, f"split file {path} lacks the key(s) {missing}")
    return data


def _json_classnames(cfg, data: dict) -> List[str]:
    """Class names in label order from the third field of every entry of every split."""
    names: Dict[int, str] = {}
    for split in JSON_SPLITS:
        for _, label, name in data[split]:
            if names.setdefault(int(label), str(name)) != str(name):
                raise _bad_data(cfg, f"split file names label {label} both {names[int(label)]!r} and {name!r}")
    if sorted(names) != list(range(len(names))):
        raise _bad_data(cfg, f"split file labels are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def _read_json(cfg, split: str) -> Listing:
    if split not in JSON_SPLITS:
        raise ConfigError(f"dataset={cfg.name} has no {split!r} split (valid: {', '.join(JSON_SPLITS)})")
    data = _load_json(cfg)
    image_dir = _image_dir(cfg)
    entries = data[split]
    paths = [image_dir / rel for rel, _, _ in entries]
    _check_first_image(cfg, paths)
    return paths, [int(label) for _, label, _ in entries], _json_classnames(cfg, data)


def _read_folders(cfg, split: str) -> Listing:
    folder = dataset_root(cfg) / _split_key(cfg, split)
    labels_of = _folder_labels(cfg, split)
    if cfg.split_format == "wnid_folders":
        names = list(read_wnid_classnames(cfg).values())
    else:
        names = [ln.partition(" ")[2].strip() for ln in _classnames_lines(cfg)]
    paths, labels = [], []
    for sub, label in labels_of.items():
        for p in sorted((folder / sub).iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                labels.append(label)
    return paths, labels, names


def _read_txt(cfg, split: str) -> Listing:
    key = _split_key(cfg, split)
    listing = dataset_root(cfg) / key
    if not listing.is_file():
        raise _not_found(cfg, f"split_paths.{split}", key, listing, f"{split} list file")
    names = _classnames_lines(cfg)
    label_of = {n: i for i, n in enumerate(names)}
    image_dir = _image_dir(cfg)
    paths, labels = [], []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image_id, _, name = line.strip().partition(" ")
        if name not in label_of:
            raise _bad_data(cfg, f"{listing}:{n}: class {name!r} is not in {cfg.classnames_file}")
        paths.append(image_dir / f"{image_id}{TXT_IMAGE_SUFFIX}")
        labels.append(label_of[name])
    _check_first_image(cfg, paths)
    return paths, labels, names


# --------------------------------------------------------------------- class subsets
def class_subset(cfg) -> Optional[List[int]]:
    """Sorted labels a partial-label-space variant covers (ImageNet-A/R: 200 of ImageNet's 1000);
    ``None``: every class. Prediction on such a set is restricted to these classes.

    From the config's ``wnids`` when given, else (``subset_from_folders``) from the class folders of
    the test split found on disk.
    """
    _check_config(cfg)
    if cfg.wnids:
        index = {w: i for i, w in enumerate(read_wnid_classnames(cfg))}
        unknown = [w for w in cfg.wnids if w not in index]
        if unknown:
            raise ConfigError(
                f"dataset.wnids of dataset={cfg.name} has ids not in {cfg.classnames_file}: {unknown[:5]}"
            )
        return sorted(index[w] for w in cfg.wnids)
    if cfg.subset_from_folders:
        return sorted(_folder_labels(cfg, "test").values())
    return None


# --------------------------------------------------------------------- a run's few-shot data
def val_is_test(cfg) -> bool:
    """True where the val split is the test split (ImageNet: CoOp evaluates on images/val and keeps the
    last epoch): such a dataset has no validation data to select on."""
    paths = cfg.split_paths
    return cfg.split_format != "json" and paths.get("val") is not None and paths.get("val") == paths.get("test")


def _take(paths: Sequence[Path], labels: Sequence[int], idx: Sequence[int]) -> Tuple[List[Path], List[int]]:
    return [paths[i] for i in idx], [labels[i] for i in idx]


def few_shot_splits(cfg, k: Optional[int], seed: int) -> dict:
    """CoOp's few-shot data of one run: ``train`` = k images per class of the train split, ``val`` =
    min(k, 4) per class of the val split (None where the val split is the test split), in draw order,
    each ``(paths, labels)``; ``test`` = the whole test split; ``classnames`` in label order; ``draw``:
    the :class:`~promptdg_cli.shots.Draw` (None without k: the full train and val splits)."""
    missing = [s for s in JSON_SPLITS if s not in available_splits(cfg)]
    if missing:
        raise ConfigError(
            f"dataset={cfg.name} has no {'/'.join(missing)} split (splits: {', '.join(available_splits(cfg))}): "
            "it is a test-only set; train on its source dataset and read its test split with read_split(cfg, 'test')"
        )
    train_p, train_y, names = read_split(cfg, "train")
    val = None if val_is_test(cfg) else read_split(cfg, "val")[:2]
    test_p, test_y, _ = read_split(cfg, "test")
    draw: Optional[Draw] = None
    if k:
        official = official_draw_file(dataset_root(cfg), k, seed)
        if official.is_file():
            draw = read_official_draw(official, (train_p, train_y), val, dataset_root(cfg))
        else:
            draw = dassl_draw(train_y, None if val is None else val[1], k, seed)
        train_p, train_y = _take(train_p, train_y, draw.train)
        if val is not None:
            assert draw.val is not None  # (a val split is drawn from)
            val = _take(*val, draw.val)
    return {"train": (train_p, train_y), "val": val, "test": (test_p, test_y), "classnames": names, "draw": draw}
