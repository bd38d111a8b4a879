"""CoOp's k-shot draw, image for image: promptdg's draw against Dassl's algorithm written out here
from its source (``DatasetBase.generate_fewshot_dataset`` and ``split_dataset_by_label`` as CoOp's
datasets call them after ``set_random_seed``), and the official ``split_fewshot`` files read
without executing anything from them."""
from __future__ import annotations

import json
import pickle
import random
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from promptdg_cli import fewshot
from promptdg_cli.schema import DatasetConfig
from promptdg_cli.shots import DrawFileError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
CLASSES = ["abyssinian", "beagle", "bengal", "boxer", "pug"]
# images per class in each split; unequal, listed interleaved, one class short of 16 train images
TRAIN = {0: 20, 1: 17, 2: 9, 3: 24, 4: 16}
VAL = {0: 6, 1: 5, 2: 3, 3: 7, 4: 4}


def _split_entries(counts: dict, split: str) -> list:
    rows = [(c, i) for c, n in counts.items() for i in range(n)]
    rng = random.Random(f"order-{split}")  # a fixed, non-grouped order: labels interleave as in CoOp's files
    rng.shuffle(rows)
    return [[f"{CLASSES[c]}/{split}_{c}_{i}.jpg", c, CLASSES[c]] for c, i in rows]


@pytest.fixture
def pets(tmp_path):
    """oxford_pets in CoOp's layout: images/ and split_zhou_OxfordPets.json (train, val, test)."""
    ds = tmp_path / "oxford_pets"
    split = {"train": _split_entries(TRAIN, "train"), "val": _split_entries(VAL, "val"),
             "test": _split_entries({c: 1 for c in range(5)}, "test")}
    for rows in split.values():
        for rel, label, _ in rows:
            (ds / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (2, 2), (label, 0, 0)).save(ds / "images" / rel, format="PNG")
    (ds / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    cfg = OmegaConf.merge(
        OmegaConf.structured(DatasetConfig), OmegaConf.load(CONF_DIR / "oxford_pets.yaml"), {"root": str(tmp_path)}
    )
    return cfg, split


class Item:
    def __init__(self, relpath, label):
        self.relpath, self.label = relpath, label


def dassl_draw(train: list, val: list, num_shots: int, seed: int):
    """Dassl's draw, as CoOp's OxfordPets.__init__ runs it: the global ``random`` seeded by the run
    seed, then ``generate_fewshot_dataset(train, k)`` and ``generate_fewshot_dataset(val, min(k, 4))``."""
    random.seed(seed)

    def generate(data_source, k):
        tracker = defaultdict(list)  # split_dataset_by_label
        for item in data_source:
            tracker[item.label].append(item)
        dataset = []
        for label, items in tracker.items():
            sampled = random.sample(items, k) if len(items) >= k else items
            dataset.extend(sampled)
        return dataset

    return generate(train, num_shots), generate(val, min(num_shots, 4))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_draw_equals_dassls_image_for_image(pets, seed, k):
    cfg, split = pets
    train = [Item(rel, label) for rel, label, _ in split["train"]]
    val = [Item(rel, label) for rel, label, _ in split["val"]]
    want_train, want_val = dassl_draw(train, val, k, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (k = 16: the class of 9 images gives all of them, with a warning)
        out = fewshot.few_shot_splits(cfg, k, seed)
    images = Path(cfg.root) / "oxford_pets" / "images"
    assert [str(p.relative_to(images)) for p in out["train"][0]] == [i.relpath for i in want_train]  # order included
    assert [str(p.relative_to(images)) for p in out["val"][0]] == [i.relpath for i in want_val]
    assert out["train"][1] == [i.label for i in want_train]
    assert out["draw"].sampler == "dassl"


def test_a_class_with_fewer_than_k_images_gives_all_of_them_and_a_warning(pets):
    cfg, split = pets
    with pytest.warns(UserWarning, match="1 class.* fewer than 16"):
        out = fewshot.few_shot_splits(cfg, 16, 1)
    assert out["train"][1].count(2) == TRAIN[2] and out["train"][1].count(0) == 16


# --------------------------------------------------------------------- the official draw files
def _fake_dassl():
    """A module ``dassl.data.datasets.base_dataset`` with a ``Datum`` as Dassl defines its data, so a
    pickle made here names the class exactly as the official files do."""
    mods = {}
    for name in ("dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"):
        mods[name] = types.ModuleType(name)

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__ = "dassl.data.datasets.base_dataset"
    Datum.__qualname__ = "Datum"
    mods["dassl.data.datasets.base_dataset"].Datum = Datum
    return mods, Datum


def write_official(path: Path, train_items: list, val_items: list, machine_root="/home/someone/data"):
    mods, Datum = _fake_dassl()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        data = {key: [Datum(impath=f"{machine_root}/oxford_pets/images/{rel}", label=label, classname=CLASSES[label])
                      for rel, label in items] for key, items in (("train", train_items), ("val", val_items))}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_the_official_draw_file_is_read_when_present(pets):
    cfg, split = pets
    # a draw that Dassl's algorithm would not make at this seed (the last images of each class, reversed)
    train = [(rel, label) for rel, label, _ in reversed(split["train"])][:7]
    val = [(rel, label) for rel, label, _ in split["val"]][:3]
    write_official(Path(cfg.root) / "oxford_pets" / "split_fewshot" / "shot_2-seed_3.pkl", train, val)
    out = fewshot.few_shot_splits(cfg, 2, 3)
    images = Path(cfg.root) / "oxford_pets" / "images"
    assert [(str(p.relative_to(images)), y) for p, y in zip(*out["train"])] == train
    assert [(str(p.relative_to(images)), y) for p, y in zip(*out["val"])] == val
    assert out["draw"].sampler == "split_fewshot/shot_2-seed_3.pkl"
    assert fewshot.few_shot_splits(cfg, 2, 1)["draw"].sampler == "dassl"  # another seed: no file, drawn here


def test_an_official_draw_file_never_executes_code(pets, tmp_path):
    cfg, _ = pets
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = Path(cfg.root) / "oxford_pets" / "split_fewshot" / "shot_1-seed_1.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({"train": [Evil()], "val": []}))
    with pytest.raises(DrawFileError, match="pathlib.*not loaded"):
        fewshot.few_shot_splits(cfg, 1, 1)
    assert not marker.exists()


def test_an_official_draw_file_of_other_images_is_a_clear_error(pets):
    cfg, split = pets
    write_official(
        Path(cfg.root) / "oxford_pets" / "split_fewshot" / "shot_1-seed_1.pkl", [("beagle/nowhere.jpg", 1)], []
    )
    with pytest.raises(DrawFileError, match="beagle/nowhere.jpg is not in this dataset's train split"):
        fewshot.few_shot_splits(cfg, 1, 1)


def test_a_dataset_whose_val_split_is_its_test_split_draws_train_only(tmp_path):
    for w in ("n01", "n02"):
        for part, n in (("train", 5), ("val", 2)):
            for i in range(n):
                f = tmp_path / "imagenet" / "images" / part / w / f"{i}.JPEG"
                f.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (2, 2)).save(f, format="PNG")
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    cfg = OmegaConf.merge(
        OmegaConf.structured(DatasetConfig), OmegaConf.load(CONF_DIR / "imagenet.yaml"), {"root": str(tmp_path)}
    )
    assert fewshot.val_is_test(cfg)
    out = fewshot.few_shot_splits(cfg, 2, 1)
    assert out["val"] is None and out["draw"].val is None
    assert sorted(out["train"][1]) == [0, 0, 1, 1]  # k = 2 per class of the train split
