"""Every ranged value of every method's schema (and of the run and dataset) is refused outside its
range on the composed config, before anything loads, with one line naming the key, the value and the
range."""
import copy
import dataclasses
import functools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from promptdg_cli.config import RunConfig, check_ranges, conf_dir, register_configs, register_resolvers
from promptdg_cli.errors import ConfigError
from promptdg_cli.schema import METHOD_SCHEMAS, DatasetConfig


def _bad_value(rng: dict, is_int: bool):
    """A value just outside the range: below its lower bound, else above its upper bound."""
    if rng.get("ge") is not None:
        return rng["ge"] - 1
    if rng.get("gt") is not None:
        return rng["gt"] - 1 if is_int else rng["gt"] - 0.5
    if rng.get("le") is not None:
        return rng["le"] + 1
    return rng["lt"] + 1


def _ranged(schema):
    for f in dataclasses.fields(schema):
        rng = f.metadata.get("range")
        if rng and any(v is not None for v in rng.values()):
            yield f, rng


CASES = [(m, f.name, rng, f.metadata.get("items", False), "int" in str(f.type))
         for m, schema in METHOD_SCHEMAS.items() for f, rng in _ranged(schema)]


@functools.lru_cache(maxsize=None)
def _composed(method):
    return _compose(f"method={method}")


def _compose(*overrides):
    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def test_every_trained_method_has_ranged_fields():
    methods = {m for m, *_ in CASES}
    assert methods == set(METHOD_SCHEMAS)
    for m in ("coop", "dapl", "dapt", "promptstyler", "domainfusion"):  # learning rate > 0, epochs >= 1
        names = {name for mm, name, *_ in CASES if mm == m}
        assert {"lr", "epochs", "batch_size"} <= names, (m, names)


@pytest.mark.parametrize("method,field,rng,items,is_int", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_a_value_outside_its_range_is_refused(method, field, rng, items, is_int):
    """The composed config (as `promptdg train method=<m>` builds it) with the value set: refused."""
    good = _composed(method)
    check_ranges(good)  # the defaults are valid
    bad = _bad_value(rng, is_int)
    cfg = copy.deepcopy(good)
    OmegaConf.update(cfg, f"method.{field}", [bad, bad] if items else bad)
    with pytest.raises(ConfigError) as e:
        check_ranges(cfg)
    msg = str(e.value)
    assert f"method.{field}=" in msg and str(bad) in msg and "must be" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("shots=0", "shots"),
        ("num_workers=-1", "num_workers"),
        ("trial_seed=-1", "trial_seed"),
        ("backbone=resnet50_imagenet backbone.image_size=4", "backbone.image_size"),
        ("dataset.val_fraction=1.0", "dataset.val_fraction"),
        ("dataset.val_fraction=0", "dataset.val_fraction"),
    ],
)
def test_run_and_dataset_ranges(override, key):
    """(Through composition with a command-line override, as a user types it.)"""
    with pytest.raises(ConfigError, match=rf"^{key}="):
        check_ranges(_compose("method=coop", *override.split()))


def test_run_and_dataset_schemas_carry_their_ranges():
    assert {f.name for f, _ in _ranged(RunConfig)} == {"shots", "trial_seed"}  # (num_workers: auto or >= 0, below)


@pytest.mark.parametrize(
    "value, ok", [("auto", True), ("0", True), ("12", True), ("-1", False), ("many", False), ("1.5", False)]
)
def test_num_workers_is_auto_or_a_count(value, ok):
    cfg = _compose("method=coop", f"num_workers={value}")
    if ok:
        check_ranges(cfg)
    else:
        with pytest.raises(ConfigError, match=r"^num_workers=.* is not valid. Valid: auto, or an integer >= 0$"):
            check_ranges(cfg)
    assert {f.name for f, _ in _ranged(DatasetConfig)} == {"val_fraction"}


def test_an_unordered_pair_and_a_bad_choice_are_refused():
    with pytest.raises(ConfigError, match="first value must be below"):
        check_ranges(_compose("method=domainfusion", "method.t_range=[0.9,0.1]"))
    with pytest.raises(ConfigError, match="method.weighting='sqrt' is not valid. Valid: 1-alpha, constant"):
        check_ranges(_compose("method=domainfusion", "method.weighting=sqrt"))
    with pytest.raises(ConfigError, match="device='gpu'"):
        check_ranges(_compose("method=coop", "device=gpu"))
