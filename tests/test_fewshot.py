"""The few-shot protocol (promptdg_cli/fewshot.py) on tiny fake datasets in CoOp's layout, read
through the real conf/dataset configs with their root pointed at a tmp folder."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from promptdg_cli import fewshot
from promptdg_cli.config import ConfigError
from promptdg_cli.errors import DatasetNotFound
from promptdg_cli.schema import DatasetConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
FEWSHOT_CONFIGS = [
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r",
]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]


def load(name: str, root: Path):
    """A real dataset config, as composed, with its data root at ``root``."""
    raw = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), raw, {"root": str(root)})


def png(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, 0, 0)).save(path)
    return path


# ---------------------------------------------------------------- fake datasets
JSON_CLASSES = ["abyssinian", "american bulldog", "Sea or Lake"]  # label order
JSON_COUNTS = {"train": 6, "val": 5, "test": 2}  # images per class


def make_pets(root: Path) -> Path:
    """oxford_pets/images/*.png + split_zhou_OxfordPets.json, CoOp's layout."""
    ds = root / "oxford_pets"
    split = {}
    for s, n in JSON_COUNTS.items():
        split[s] = []
        for label, name in enumerate(JSON_CLASSES):
            for i in range(n):
                rel = f"{name.replace(' ', '_')}_{s}_{i}.png"
                png(ds / "images" / rel, label)
                split[s].append([rel, label, name])
    (ds / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return ds


def make_imagenet(root: Path) -> None:
    """imagenet/images/{train,val}/<wnid>/ + imagenet/classnames.txt of 5 wnids."""
    lines = [f"{w} {n}" for w, n in zip(WNIDS, NAMES)]
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("\n".join(lines) + "\n")
    for split, n in (("train", 3), ("val", 2)):
        for w in WNIDS:
            for i in range(n):
                png(root / "imagenet" / "images" / split / w / f"{w}_{i}.JPEG")


def make_imagenet_a(root: Path, wnids=(WNIDS[1], WNIDS[3])) -> None:
    folder = root / "imagenet-adversarial" / "imagenet-a"
    for w in wnids:
        for i in range(2):
            png(folder / w / f"{i}.jpg")
    (folder / "README.txt").write_text("not a class folder")


def make_imagenet_v2(root: Path) -> None:
    folder = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in range(len(WNIDS)):
        for i in range(label + 1):  # label L holds L+1 images
            png(folder / str(label) / f"{i}.jpeg")


VARIANTS = ["707-320", "Boeing 717", "F-16A/B"]  # names with digits, spaces and slashes


def make_fgvc(root: Path) -> None:
    ds = root / "fgvc_aircraft"
    ds.mkdir(parents=True)
    (ds / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for v in VARIANTS:
            for _ in range(2):
                n += 1
                png(ds / "images" / f"{n:07d}.jpg")
                lines.append(f"{n:07d} {v}")
        (ds / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def pets(tmp_path):
    make_pets(tmp_path)
    return load("oxford_pets", tmp_path)


@pytest.fixture
def imagenet_root(tmp_path):
    make_imagenet(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- split files
def test_read_split_json(pets, tmp_path):
    paths, labels, names = fewshot.read_split(pets, "train")
    assert names == JSON_CLASSES  # the split file's third field, in label order
    assert len(paths) == 3 * JSON_COUNTS["train"]
    assert Counter(labels) == {0: 6, 1: 6, 2: 6}
    assert paths[0] == tmp_path / "oxford_pets" / "images" / "abyssinian_train_0.png"
    assert all(p.is_file() for p in paths)
    for split, n in JSON_COUNTS.items():
        p, y, _ = fewshot.read_split(pets, split)
        assert len(p) == len(y) == 3 * n
        assert all(f"_{split}_" in q.name for q in p)


def test_read_split_image_dir_may_be_the_dataset_folder(tmp_path):
    ds = tmp_path / "stanford_cars"
    png(ds / "cars_train" / "00001.jpg")
    png(ds / "cars_test" / "00001.jpg")
    split = {"train": [["cars_train/00001.jpg", 0, "AM General Hummer SUV 2000"]], "val": [],
             "test": [["cars_test/00001.jpg", 0, "AM General Hummer SUV 2000"]]}
    (ds / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    paths, labels, names = fewshot.read_split(load("stanford_cars", tmp_path), "test")
    assert paths == [ds / "cars_test" / "00001.jpg"] and labels == [0] and names == ["AM General Hummer SUV 2000"]


def test_missing_split_file_names_key_and_layout(tmp_path):
    cfg = load("oxford_pets", tmp_path)
    with pytest.raises(DatasetNotFound) as e:
        fewshot.read_split(cfg, "train")
    msg = str(e.value)
    assert "dataset.split_file='split_zhou_OxfordPets.json'" in msg
    assert str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json") in msg
    assert "Expected layout:" in msg and "images/" in msg and "[relpath, label, classname]" in msg
    assert cfg.prepare.strip() in msg  # how to get it


def test_missing_image_folder_names_key_and_layout(tmp_path):
    ds = make_pets(tmp_path)
    (ds / "images").rename(ds / "elsewhere")
    with pytest.raises(DatasetNotFound) as e:
        fewshot.read_split(load("oxford_pets", tmp_path), "test")
    msg = str(e.value)
    assert "dataset.image_dir='images'" in msg and str(ds / "images") in msg
    assert "Expected layout:" in msg and "split_zhou_OxfordPets.json" in msg


def test_image_folder_without_the_split_files_images_is_reported(tmp_path):
    ds = make_pets(tmp_path)
    (ds / "images").rename(ds / "inner")
    (ds / "images").mkdir()
    (ds / "inner").rename(ds / "images" / "images")  # extracted one level too deep
    with pytest.raises(DatasetNotFound, match="image_dir"):
        fewshot.read_split(load("oxford_pets", tmp_path), "train")


def test_read_split_rejects_unknown_split_and_dg_dataset(pets):
    with pytest.raises(ConfigError, match="trainval"):
        fewshot.read_split(pets, "trainval")
    dg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(CONF_DIR / "pacs.yaml"))
    with pytest.raises(ConfigError, match="protocol='fewshot'"):
        fewshot.read_split(dg, "train")


# ---------------------------------------------------------------- a run's data (the draw itself: test_shots.py)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_few_shot_splits(pets, k):
    out = fewshot.few_shot_splits(pets, k, seed=1)
    assert out["classnames"] == JSON_CLASSES
    (tp, ty), (vp, vy), (sp, sy) = out["train"], out["val"], out["test"]
    assert Counter(ty) == {c: k for c in range(3)} and len(tp) == len(ty)
    assert Counter(vy) == {c: min(k, 4) for c in range(3)} and len(vp) == len(vy)  # CoOp's val sample
    assert len(sp) == len(sy) == 3 * JSON_COUNTS["test"]  # the whole test split
    assert all("_train_" in p.name for p in tp) and all("_val_" in p.name for p in vp)
    again = fewshot.few_shot_splits(pets, k, seed=1)
    assert again["train"] == out["train"] and again["val"] == out["val"]
    if k < JSON_COUNTS["train"]:
        assert fewshot.few_shot_splits(pets, k, seed=2)["train"] != out["train"]


@pytest.mark.parametrize("k", [None, 0])
def test_few_shot_splits_without_k_is_the_full_split(pets, k):
    out = fewshot.few_shot_splits(pets, k, seed=1)
    assert len(out["train"][0]) == 3 * JSON_COUNTS["train"]
    assert len(out["val"][0]) == 3 * JSON_COUNTS["val"]


# ---------------------------------------------------------------- ImageNet and its variants
def test_imagenet_labels_follow_classnames_txt(imagenet_root):
    cfg = load("imagenet", imagenet_root)
    paths, labels, names = fewshot.read_split(cfg, "train")
    assert names == NAMES
    assert Counter(labels) == {i: 3 for i in range(5)}
    assert all(p.parent.name == WNIDS[y] for p, y in zip(paths, labels))
    test_p, test_y, _ = fewshot.read_split(cfg, "test")
    assert len(test_p) == 10 and all("/images/val/" in str(p) for p in test_p)
    assert fewshot.class_subset(cfg) is None
    out = fewshot.few_shot_splits(cfg, 2, seed=1)
    assert Counter(out["train"][1]) == {i: 2 for i in range(5)}


def test_imagenet_a_keeps_1000_class_labels_and_restricts_prediction(imagenet_root):
    make_imagenet_a(imagenet_root)  # wnids 1 and 3 of imagenet's classnames.txt, and a README.txt
    cfg = load("imagenet_a", imagenet_root)
    paths, labels, names = fewshot.read_split(cfg, "test")
    assert names == NAMES  # the full label space
    assert sorted(set(labels)) == [1, 3]
    assert all(p.parent.name == WNIDS[y] for p, y in zip(paths, labels))
    assert fewshot.class_subset(cfg) == [1, 3]


def test_imagenet_r_config_reads_the_same_way(imagenet_root):
    folder = imagenet_root / "imagenet-rendition" / "imagenet-r"
    for w in (WNIDS[4], WNIDS[0]):
        png(folder / w / "art_0.jpg")
    cfg = load("imagenet_r", imagenet_root)
    assert fewshot.read_split(cfg, "test")[1] == [0, 4]
    assert fewshot.class_subset(cfg) == [0, 4]


def test_class_subset_from_a_wnid_list(imagenet_root):
    make_imagenet_a(imagenet_root)
    cfg = load("imagenet_a", imagenet_root)
    cfg.subset_from_folders = False
    cfg.wnids = [WNIDS[3], WNIDS[1], WNIDS[2]]
    assert fewshot.class_subset(cfg) == [1, 2, 3]
    cfg.wnids = [WNIDS[1]]  # a folder on disk outside the listed subset
    with pytest.raises(DatasetNotFound, match=WNIDS[3]):
        fewshot.read_split(cfg, "test")
    cfg.wnids = ["n99999999"]
    with pytest.raises(ConfigError, match="n99999999"):
        fewshot.class_subset(cfg)


def test_unknown_wnid_folder_is_reported(imagenet_root):
    make_imagenet_a(imagenet_root, wnids=(WNIDS[0], "n12345678"))
    with pytest.raises(DatasetNotFound, match="n12345678"):
        fewshot.read_split(load("imagenet_a", imagenet_root), "test")


def test_imagenet_v2_labels_are_the_folder_index(imagenet_root):
    make_imagenet_v2(imagenet_root)
    cfg = load("imagenet_v2", imagenet_root)
    paths, labels, names = fewshot.read_split(cfg, "test")
    assert names == NAMES
    assert Counter(labels) == {i: i + 1 for i in range(5)}
    assert all(int(p.parent.name) == y for p, y in zip(paths, labels))
    assert fewshot.class_subset(cfg) is None


def test_variants_are_test_only(imagenet_root):
    make_imagenet_v2(imagenet_root)
    cfg = load("imagenet_v2", imagenet_root)
    assert fewshot.available_splits(cfg) == ["test"]
    with pytest.raises(ConfigError, match="test-only"):
        fewshot.read_split(cfg, "train")
    with pytest.raises(ConfigError, match="test-only"):
        fewshot.few_shot_splits(cfg, 1, seed=1)


def test_variant_without_imagenet_classnames_names_the_key(tmp_path):
    make_imagenet_a(tmp_path)
    with pytest.raises(DatasetNotFound) as e:
        fewshot.read_split(load("imagenet_a", tmp_path), "test")
    msg = str(e.value)
    assert "dataset.classnames_file='imagenet/classnames.txt'" in msg
    assert str(tmp_path / "imagenet" / "classnames.txt") in msg and "Expected layout:" in msg


def test_missing_imagenet_split_folder_names_key_and_layout(imagenet_root):
    cfg = load("imagenet_sketch", imagenet_root)
    with pytest.raises(DatasetNotFound) as e:
        fewshot.read_split(cfg, "test")
    msg = str(e.value)
    assert "dataset.split_paths.test='images'" in msg
    assert str(imagenet_root / "imagenet-sketch" / "images") in msg
    assert "<wnid, e.g. n01440764>" in msg and "How to get it:" in msg


# ---------------------------------------------------------------- FGVC-Aircraft
def test_fgvc_aircraft_lists(tmp_path):
    make_fgvc(tmp_path)
    cfg = load("fgvc_aircraft", tmp_path)
    paths, labels, names = fewshot.read_split(cfg, "train")
    assert names == VARIANTS
    assert labels == [0, 0, 1, 1, 2, 2]  # "Boeing 717" with its space, "F-16A/B" with its slash
    assert paths[0] == tmp_path / "fgvc_aircraft" / "images" / "0000001.jpg"
    assert fewshot.read_split(cfg, "test")[0][0].name == "0000013.jpg"
    out = fewshot.few_shot_splits(cfg, 1, seed=1)
    assert Counter(out["train"][1]) == {0: 1, 1: 1, 2: 1}


def test_fgvc_aircraft_unknown_variant_and_missing_list(tmp_path):
    make_fgvc(tmp_path)
    ds = tmp_path / "fgvc_aircraft"
    with open(ds / "images_variant_val.txt", "a") as f:
        f.write("0000001 Boeing 999\n")
    cfg = load("fgvc_aircraft", tmp_path)
    with pytest.raises(DatasetNotFound, match="Boeing 999"):
        fewshot.read_split(cfg, "val")
    (ds / "images_variant_test.txt").unlink()
    with pytest.raises(DatasetNotFound) as e:
        fewshot.read_split(cfg, "test")
    assert "dataset.split_paths.test='images_variant_test.txt'" in str(e.value)
    assert "variants.txt" in str(e.value)


# ---------------------------------------------------------------- the configs
@pytest.mark.parametrize("name", FEWSHOT_CONFIGS)
def test_fewshot_config(name):
    raw = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), raw)  # unknown keys or bad types fail
    assert cfg.name == name and cfg.protocol == "fewshot" and cfg.metric == "top1"
    assert OmegaConf.to_container(raw)["root"] == "${data_root}"  # unresolved
    assert cfg.split_format in fewshot.FORMATS
    assert list(cfg.domains) == [] and dict(cfg.classes) == {}
    if cfg.split_format == "json":
        assert cfg.split_file and cfg.split_file.startswith("split_zhou_") and cfg.split_file.endswith(".json")
    else:
        assert cfg.classnames_file and "test" in cfg.split_paths
    prepare = cfg.prepare.strip()
    assert prepare and "\n" in prepare and "$PROMPTDG_DATA" in prepare and f"{cfg.folder}/" in prepare


def test_fewshot_configs_point_variants_at_imagenet_classnames():
    for name in ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert OmegaConf.load(CONF_DIR / f"{name}.yaml").classnames_file == "imagenet/classnames.txt"
    assert [n for n in FEWSHOT_CONFIGS if OmegaConf.load(CONF_DIR / f"{n}.yaml").get("subset_from_folders")] == [
        "imagenet_a", "imagenet_r",
    ]
