"""Data: DG splits are deterministic and never leak the target; the feature cache hits, misses and
invalidates; missing or mis-laid folders and corrupt images get clear treatment."""
import os
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from promptdg_cli.config import conf_dir
from promptdg_cli.data import FeatureCache, dataset_dir
from promptdg_cli.errors import ConfigError, DatasetNotFound
from promptdg_cli.protocols import DG, RunSpec, dg_splits, train_val_indices
from promptdg_cli.schema import DatasetConfig


def load(name):
    """A dataset YAML merged onto its schema, as composition does."""
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(conf_dir() / "dataset" / f"{name}.yaml"))


def dataset_cfg(root, per_class=6, **kw):
    cfg = load("demo_digits")
    cfg.root = str(root)
    cfg.generator_args.per_class = per_class
    for k, v in kw.items():
        cfg[k] = v
    return cfg



@pytest.fixture
def world(tmp_path):
    cfg = dataset_cfg(tmp_path / "data")
    dataset_dir(cfg)  # generates it
    cfg.generator = None  # from now on it is a plain folder on disk
    return cfg


def test_split_is_deterministic_and_80_20():
    a_tr, a_va = train_val_indices(100, seed=1, domain="sketch", val_fraction=0.2)
    b_tr, b_va = train_val_indices(100, seed=1, domain="sketch", val_fraction=0.2)
    c_tr, _ = train_val_indices(100, seed=2, domain="sketch", val_fraction=0.2)
    d_tr, _ = train_val_indices(100, seed=1, domain="photo", val_fraction=0.2)
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_va, b_va)
    assert len(a_tr) == 80 and len(a_va) == 20 and not set(a_tr) & set(a_va)
    assert set(a_tr) | set(a_va) == set(range(100))
    assert not np.array_equal(a_tr, c_tr) and not np.array_equal(a_tr, d_tr)


def test_leave_one_domain_out_splits(world):
    splits = dg_splits(world, target=None, source=None)
    assert [s.target for s in splits] == list(world.domains)
    for s in splits:
        assert s.target not in s.sources and len(s.sources) == 3
    only = dg_splits(world, target="sketch", source=["photo"])
    assert len(only) == 1 and only[0].sources == ["photo"]
    with pytest.raises(ConfigError, match="target='cartoon' is not a domain of dataset=demo_digits. Valid"):
        dg_splits(world, target="cartoon", source=None)


def test_no_target_image_in_training_or_model_selection(world, clip, tmp_path):
    cache = FeatureCache(tmp_path / "cache", num_workers=0)
    protocol = DG(world, RunSpec(seed=1)).attach(cache, clip)
    for split in protocol.splits():
        data, (test,) = protocol.train_data(split), protocol.test_sets(split).values()
        target_paths = set(test.paths)
        assert all(f"/{split.target}/" in p for p in target_paths)
        assert not target_paths & set(data.train.paths)
        assert not target_paths & set(data.val.paths)
        assert data.target is None  # DG: nothing of the target in training
        assert set(data.train.domain) == set(split.sources) == set(data.val.domain)
        assert not set(data.train.paths) & set(data.val.paths)
        assert len(test) == 60 - int(60 * 0.2)  # the target domain's "in" part (DomainBed reports it; 10 classes x 6)


def test_feature_cache_hit_miss_and_invalidation(world, clip, tmp_path):
    cache = FeatureCache(tmp_path / "cache", num_workers=0)
    first = cache.domain_features(clip, world, "sketch")
    assert (cache.hits, cache.misses) == (0, 1)
    again = cache.domain_features(clip, world, "sketch")
    assert (cache.hits, cache.misses) == (1, 1)
    assert (first.x == again.x).all() and first.paths == again.paths
    # another domain is another entry
    cache.domain_features(clip, world, "photo")
    assert cache.misses == 2
    # replacing an image invalidates the entry
    img = sorted((tmp_path / "data" / "demo_digits" / "sketch" / "three").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    os.utime(img, ns=(1, 1))
    changed = cache.domain_features(clip, world, "sketch")
    assert cache.misses == 3
    i = changed.paths.index(str(img))
    assert not (changed.x[i] == first.x[i]).all()
    # other weights are other entries
    assert FeatureCache.key({"model": "m", "weights": "a"}, "d", "x", [img], "t") != FeatureCache.key(
        {"model": "m", "weights": "b"}, "d", "x", [img], "t"
    )


def test_corrupt_images_are_skipped_and_counted(world, clip, tmp_path):
    folder = tmp_path / "data" / "demo_digits" / "photo" / "five"
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "empty.jpg").write_bytes(b"")
    cache = FeatureCache(tmp_path / "cache", num_workers=0)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file"):
        feats = cache.domain_features(clip, world, "photo")
    assert len(feats) == 60 and not any("broken" in p for p in feats.paths)


def test_missing_dataset_names_expected_layout_and_how_to_get_it(tmp_path):
    cfg = load("pacs")
    cfg.root = str(tmp_path)
    with pytest.raises(DatasetNotFound) as e:
        dataset_dir(cfg)
    msg = str(e.value)
    assert f"{tmp_path}/PACS does not exist" in msg
    assert "Expected layout" in msg and "art_painting/" in msg and "dog/" in msg
    assert "domainbed.scripts.download" in msg


def test_mislaid_dataset_names_the_missing_domain(world, tmp_path):
    shutil.rmtree(tmp_path / "data" / "demo_digits" / "sketch")
    with pytest.raises(DatasetNotFound, match=r"domain folder\(s\) \['sketch'\] missing"):
        dataset_dir(world)


def test_unknown_class_folder_is_reported(world, tmp_path):
    (tmp_path / "data" / "demo_digits" / "photo" / "eleven").mkdir()
    with pytest.raises(DatasetNotFound, match="class folders the config does not know: \\['eleven'\\]"):
        dataset_dir(world)
