"""The benchmark dataset configs in conf/dataset: they merge onto DatasetConfig and name the
exact domain/class folders of the real datasets, in label order, with usable prompt names."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from promptdg_cli.schema import DatasetConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"

# file stem -> what the config must say (folder and domain names as DomainBed's downloader
# writes them; VisDA-2017 and mini-DomainNet are not in DomainBed).
EXPECTED = {
    "pacs": dict(
        folder="PACS",
        protocol="dg",
        metric="top1",
        n_classes=7,
        domains=["art_painting", "cartoon", "photo", "sketch"],
    ),
    "vlcs": dict(
        folder="VLCS",
        protocol="dg",
        metric="top1",
        n_classes=5,
        domains=["Caltech101", "LabelMe", "SUN09", "VOC2007"],
    ),
    "officehome": dict(
        folder="office_home",
        protocol="dg",
        metric="top1",
        n_classes=65,
        domains=["Art", "Clipart", "Product", "Real World"],
    ),
    "domainnet": dict(
        folder="domain_net",
        protocol="dg",
        metric="top1",
        n_classes=345,
        domains=["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
    ),
    "terra_incognita": dict(
        folder="terra_incognita",
        protocol="dg",
        metric="top1",
        n_classes=10,
        domains=["location_100", "location_38", "location_43", "location_46"],
    ),
    "visda17": dict(
        folder="visda17",
        protocol="uda",
        metric="mean_per_class",
        n_classes=12,
        domains=["train", "validation"],
    ),
    "mini_domainnet": dict(
        folder="mini_domainnet",
        protocol="uda",
        metric="top1",
        n_classes=126,
        domains=["clipart", "painting", "real", "sketch"],
    ),
}

NAMES = sorted(EXPECTED)


def load(name: str):
    """The YAML merged onto the schema, as Hydra composes it (unknown keys or bad types fail)."""
    raw = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), raw)


@pytest.fixture(params=NAMES)
def case(request):
    name = request.param
    return name, load(name), EXPECTED[name]


def test_every_benchmark_file_exists():
    on_disk = {p.stem for p in CONF_DIR.glob("*.yaml")}
    assert set(NAMES) <= on_disk, f"missing: {sorted(set(NAMES) - on_disk)}"


def test_identity(case):
    name, cfg, exp = case
    assert cfg.name == name
    assert cfg.folder == exp["folder"]
    assert cfg.protocol == exp["protocol"]
    assert cfg.metric == exp["metric"]
    assert 0.0 < cfg.val_fraction < 1.0
    assert cfg.generator is None  # real datasets are never generated


def test_domains(case):
    _, cfg, exp = case
    assert list(cfg.domains) == exp["domains"]
    assert all(isinstance(d, str) for d in cfg.domains)


def check_classes(cfg, n_classes: int) -> None:
    folders = list(cfg.classes)
    assert len(folders) == n_classes, f"{len(folders)} classes, expected {n_classes}"
    # labels follow sorted folder names, the order ImageFolder/DomainBed assign them
    assert folders == sorted(folders), "class folders are not in sorted (label) order"


def check_human_names(cfg) -> None:
    human = [cfg.classes[f] for f in cfg.classes]
    assert all(isinstance(h, str) and h and h == h.strip() for h in human), "empty or padded prompt name"
    dupes = sorted({h for h in human if human.count(h) > 1})
    assert not dupes, f"duplicate prompt names: {dupes}"
    underscored = [h for h in human if "_" in h]
    assert not underscored, f"prompt names with underscores: {underscored}"
    all_caps = [h for h in human if any(c.isalpha() for c in h) and h.isupper()]
    assert not all_caps, f"all-caps prompt names: {all_caps}"


def test_class_count_and_label_order(case):
    _, cfg, exp = case
    check_classes(cfg, exp["n_classes"])


def test_human_names(case):
    _, cfg, _ = case
    check_human_names(cfg)


def test_prepare_text(case):
    _, cfg, exp = case
    text = cfg.prepare  # reading it also proves it holds no broken ${...} interpolation
    assert "\n" in text.strip(), "prepare should be a multi-line explanation"
    assert "$PROMPTDG_DATA" in text
    assert f"{exp['folder']}/" in text  # shows the final tree under the data root


# ---------------------------------------------------------------- facts about specific datasets
def test_officehome_keeps_the_archive_folder_names():
    cfg = load("officehome")
    assert "Real World" in cfg.domains  # with the space, as unpacked by DomainBed
    for folder in ("Alarm_Clock", "TV", "ToothBrush", "Postit_Notes", "Flipflops", "Trash_Can"):
        assert folder in cfg.classes
    # the prompt names are the official reader's (Dassl's office_home.py: lower-cased folder names,
    # written with spaces by DAPL's PromptLearner), not re-worded ones
    assert {f: cfg.classes[f] for f in ("TV", "Postit_Notes", "Flipflops", "Trash_Can")} == {
        "TV": "tv", "Postit_Notes": "postit notes", "Flipflops": "flipflops", "Trash_Can": "trash can"}
    assert all(name == folder.lower().replace("_", " ") for folder, name in cfg.classes.items())
    assert cfg.domain_names["Real World"] == "real_world"  # Dassl's domain folder, as DAPL's prompts write it
    # case-sensitive sort, as ImageFolder: "TV" before "Table"
    folders = list(cfg.classes)
    assert folders.index("TV") < folders.index("Table")


def test_domainnet_special_folders():
    cfg = load("domainnet")
    folders = list(cfg.classes)
    assert folders[:3] == ["The_Eiffel_Tower", "The_Great_Wall_of_China", "The_Mona_Lisa"]
    assert cfg.classes["The_Eiffel_Tower"] == "Eiffel Tower"
    assert cfg.classes["teddy-bear"] == "teddy bear"
    assert "t-shirt" in cfg.classes and folders[-1] == "zigzag"


def test_mini_domainnet_is_a_subset_of_domainnet_with_the_same_prompt_names():
    full, mini = load("domainnet"), load("mini_domainnet")
    extra = [f for f in mini.classes if f not in full.classes]
    assert not extra, f"not DomainNet class folders: {extra}"
    assert {f: mini.classes[f] for f in mini.classes} == {f: full.classes[f] for f in mini.classes}
    assert set(mini.domains) <= set(full.domains)


def test_terra_incognita_classes():
    cfg = load("terra_incognita")
    assert list(cfg.classes) == [
        "bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel",
    ]


# ---------------------------------------------------------------- the checks can fail
@pytest.mark.parametrize(
    "classes",
    [
        {"dog": "dog", "cat": "cat"},  # wrong count
        {"giraffe": "giraffe", "dog": "dog", "elephant": "elephant", "guitar": "guitar",
         "horse": "horse", "house": "house", "person": "person"},  # not in label order
    ],
)
def test_check_classes_rejects(classes):
    bad = load("pacs")
    bad.classes = classes
    with pytest.raises(AssertionError):
        check_classes(bad, 7)


@pytest.mark.parametrize(
    "classes",
    [
        {"a": "dog", "b": "dog"},  # duplicate prompt name
        {"Alarm_Clock": "Alarm_Clock"},  # underscore left in
        {"TV": "TV"},  # all caps
        {"x": ""},  # empty
    ],
)
def test_check_human_names_rejects(classes):
    bad = load("pacs")
    bad.classes = classes
    with pytest.raises(AssertionError):
        check_human_names(bad)


def test_schema_rejects_a_misspelled_key():
    with pytest.raises(Exception):
        OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"domain": ["a"]})
