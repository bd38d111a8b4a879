"""Config composition: every method x dataset x backbone composes; typos fail at composition."""
import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from promptdg_cli.config import ConfigError, conf_dir, config_hash, register_configs, register_resolvers
from promptdg_cli.methods import builtin_methods, method_class


def choices(group):
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def hydra_ctx():
    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_every_method_config_names_an_importable_class_that_takes_it():
    """conf/method is the list of built-in methods: each YAML (or the one it extends) names its class with
    ``_target_``, the class imports, and its schema is the one the YAML is composed onto."""
    from promptdg_cli.methods.base import Method
    from promptdg_cli.schema import METHOD_SCHEMAS

    targets = builtin_methods()
    assert set(targets) == set(choices("method")) and all(targets.values())
    for choice, target in targets.items():
        cls = method_class({"_target_": target})
        name = OmegaConf.load(conf_dir() / "method" / f"{choice}.yaml").name
        assert issubclass(cls, Method) and cls.Config is METHOD_SCHEMAS[name], choice


# Every method with every dataset, and every method with every backbone: a group's options do not
# interact with the third group, and the full product (over a thousand compositions) would cost minutes.
COMBINATIONS = sorted(
    {(m, d, "vit_b16") for m, d in itertools.product(choices("method"), choices("dataset"))}
    | {(m, "pacs", b) for m, b in itertools.product(choices("method"), choices("backbone"))}
)


@pytest.mark.parametrize("method,dataset,backbone", COMBINATIONS)
def test_every_combination_composes(method, dataset, backbone):
    cfg = compose(
        "train", overrides=[f"method={method}", f"dataset={dataset}", f"backbone={backbone}"], return_hydra_config=True
    )
    assert cfg.method.name in builtin_methods() and cfg.method._target_.startswith("promptdg_cli.methods.")
    assert cfg.dataset.name == dataset and cfg.backbone.name == backbone
    assert len(cfg.dataset.classes) == len(set(cfg.dataset.classes.values()))
    # the run directory is named by the hash of the config
    run_dir = cfg.hydra.run.dir  # resolves the run-key interpolation
    assert run_dir.endswith(config_hash(cfg)) and f"/{dataset}/{cfg.method.name}/{backbone}/" in run_dir
    body = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    OmegaConf.resolve(body)  # everything else resolves too


@pytest.mark.parametrize(
    "override,error",
    [
        ("method.lrr=0.1", ConfigCompositionException),  # misspelled method key
        ("dataset.domainz=[a]", ConfigCompositionException),
        ("backbone.pretraind=x", ConfigCompositionException),
        ("seeed=3", ConfigCompositionException),
        ("method.lr=fast", ConfigCompositionException),  # wrong type
    ],
)
def test_typos_fail_at_composition(override, error):
    with pytest.raises(error):
        compose("train", overrides=["method=coop", override])


def test_unknown_choice_lists_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose("train", overrides=["method=nope"])
    assert "coop" in str(e.value) and "linear_probe" in str(e.value)


def test_an_unknown_method_name_lists_the_configs_and_the_nearest():
    with pytest.raises(ConfigError, match="Valid: coop, dapl, .*Did you mean 'coop'"):
        method_class({"name": "coopp"})


def test_run_key_separates_configs_and_is_stable():
    a = compose("train", overrides=["method=coop", "seed=1"])
    b = compose("train", overrides=["method=coop", "seed=2"])
    c = compose("train", overrides=["method=coop", "seed=1", "num_workers=7", "device=cpu"])  # not results-changing
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(c)
    d = compose("train", overrides=["method=coop", "method.lr=0.01"])
    assert config_hash(a) != config_hash(d)


def test_eval_defaults_to_zeroshot_and_demo_world():
    cfg = compose("eval")
    assert cfg.method.name == "zeroshot" and cfg.dataset.name == "demo_digits" and cfg.backbone.name == "demo_clip"


def test_paper_defaults_of_coop():
    m = compose("train", overrides=["method=coop"]).method
    assert (m.n_ctx, m.lr, m.batch_size, m.class_specific, m.momentum) == (16, 0.002, 32, False, 0.9)


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_experiment_sweeps_only_valid_choices(experiment):
    """A paper table's sweep names only configs that exist (a typo would fail hours into a sweep)."""
    cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert {"method", "dataset", "backbone", "seed"} <= set(params)
    for group in ("method", "dataset", "backbone"):
        for value in str(params[group]).split(","):
            assert value in choices(group), f"{experiment}: {group}={value} does not exist"
    # the papers' three seeds; DomainBed's tables: its three trials (seed = trial_seed 0, 1, 2: DomainBed's splits)
    assert [int(s) for s in str(params.seed).split(",")] == (
        [0, 1, 2] if experiment.startswith("domainfusion") else [1, 2, 3]
    )


def test_domainfusion_main_is_the_papers_setting():
    """{erm, domainfusion} x the four DomainBed datasets on the ImageNet ResNet-50, DomainBed's recipe."""
    cfg = compose("train", overrides=["experiment=domainfusion_main"], return_hydra_config=True)
    p = cfg.hydra.sweeper.params
    assert set(p.method.split(",")) == {"erm", "domainfusion"} and p.backbone == "resnet50_imagenet"
    assert set(p.dataset.split(",")) == {"pacs", "vlcs", "officehome", "terra_incognita"}
    run = compose("train", overrides=["method=domainfusion", "dataset=terra_incognita", "backbone=resnet50_imagenet"])
    m, b = run.method, run.backbone
    assert (m.lr, m.batch_size, m.weight_decay, m.steps, m.checkpoint_freq, m.select, m.ldm_resolution) == (
        5e-5,
        32,
        0.0,
        5001,
        300,
        "val",
        None,
    )
    assert (b.kind, b.model, b.pretrained, b.image_size) == ("classifier", "resnet50", "IMAGENET1K_V1", 224)
    net = compose("train", overrides=["method=domainfusion", "dataset=domainnet", "backbone=resnet50_imagenet"]).method
    assert (net.checkpoint_freq, net.synthetic_fraction, net.augment_every) == (1000, 0.005, 2)
    cheap = compose("train", overrides=["method=domainfusion_256"]).method
    assert cheap.ldm_resolution == 256 and cheap.variant  # a named option, shown in the tables


def test_promptstyler_main_is_the_papers_grid():
    cfg = compose("train", overrides=["experiment=promptstyler_main"], return_hydra_config=True)
    p = cfg.hydra.sweeper.params
    assert set(p.method.split(",")) == {"zeroshot_name", "zeroshot", "promptstyler"}
    assert set(p.dataset.split(",")) == {"pacs", "vlcs", "officehome", "domainnet"}
    assert set(p.backbone.split(",")) == {"rn50", "vit_b16", "vit_l14"}


def test_few_shot_schema_fields_do_not_rename_existing_runs():
    """Fields added for split-file datasets are hashed only when set, so DomainBed runs keep their directories."""
    from promptdg_cli.config import hashed_view

    view = hashed_view(compose("train", overrides=["dataset=pacs"]))
    assert not {"split_format", "split_file", "image_dir", "split_paths", "classnames_file", "wnids"} & set(
        view["dataset"]
    )
    fewshot = hashed_view(compose("train", overrides=["dataset=oxford_pets"]))
    assert fewshot["dataset"]["split_file"]  # set: part of the identity
