"""Shared fixtures: a tiny demo world, a random-weight demo CLIP checkpoint, and a CLI runner.

Tests never touch the network (HF_HUB_OFFLINE=1) nor the user's caches: every run gets its own
cache and output roots under pytest's tmp dirs.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import promptdg_cli.backbone  # noqa: E402,F401  (the torchvision shim must precede open_clip)

# isort: split
import open_clip  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from promptdg_cli.backbone import ClipBackbone  # noqa: E402
from promptdg_cli.cli import main as cli_main  # noqa: E402


@pytest.fixture(scope="session")
def random_clip(tmp_path_factory) -> Path:
    """A demo-clip-vit checkpoint with random weights: plumbing tests need no trained model."""
    path = tmp_path_factory.mktemp("weights") / "random-demo-clip.safetensors"
    torch.manual_seed(0)
    model = open_clip.create_model("demo-clip-vit")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def clip(random_clip):
    """The random-weight demo CLIP as a ClipBackbone."""
    cfg = SimpleNamespace(model="demo-clip-vit", pretrained=str(random_clip), builder=None, cache_dir=None, arch="vit")
    return ClipBackbone.from_config(cfg)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache root for the session: the tiny world and its features are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run_cli(tmp_path, shared_cache, random_clip, monkeypatch, capsys):
    """Run `promptdg <args>` in-process on the tiny demo world; returns (exit code, out, err, out_root)."""
    out_root = tmp_path / "outputs"
    monkeypatch.setenv("PROMPTDG_CACHE", str(shared_cache))
    monkeypatch.setenv("PROMPTDG_OUT", str(out_root))

    def run(*args: str, tiny: bool = True, clip: bool = True):
        extra = list(TINY) + ([f"backbone.pretrained={random_clip}"] if clip else []) if tiny else []
        try:
            flags = [a for a in args[1:] if a.startswith("-")]
            overrides = [a for a in args[1:] if not a.startswith("-")]
            code = cli_main([args[0], *flags, *extra, *overrides]) if args[0] != "collect" else cli_main(list(args))
        except SystemExit as e:  # Hydra exits on errors
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err, out_root

    return run


# a tiny world and a random demo CLIP: the whole CLI in seconds
TINY = ("dataset.generator_args.per_class=8", "backbone.builder=null", "num_workers=0")


def method_cfg(choice: str, *overrides: str, dataset: str = "demo_digits"):
    """A method's config exactly as `promptdg train method=<choice>` composes it (config.compose_method)."""
    from promptdg_cli.config import compose_method

    return compose_method(choice, *overrides, dataset=dataset)


def results(out_root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out_root.rglob("results.json"))]


def build_tiny_ldm(folder: Path, seed: int = 0) -> Path:
    """A latent diffusion model with random weights in the demo LDM's layout: a 3-level VAE (32 px ->
    4x8x8 latents) and a 2-level UNet cross-attending to the demo CLIP's 128-wide text states."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from promptdg_cli.ldm import DEMO_MARKER

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32),
                                layers_per_block=1, cross_attention_dim=128, attention_head_dim=4, norm_num_groups=4)
    vae.save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler"
    )
    (folder / DEMO_MARKER).write_text(json.dumps({"clip_model": "demo-clip-vit"}))
    return folder


@pytest.fixture(scope="session")
def tiny_ldm_dir(tmp_path_factory):
    """DomainFusion's LDM in tests (method.ldm=<this folder>)."""
    return build_tiny_ldm(tmp_path_factory.mktemp("tiny_ldm"))


def build_tiny_sd(folder: Path) -> Path:
    """The tiny LDM in Stable Diffusion's layout: its VAE and UNet, and a text encoder and tokenizer of
    its own (a 1-layer transformers CLIPTextModel, 16 positions), so that it conditions a classifier
    backbone's DomainFusion the way SD v1.5 does (no CLIP backbone needed)."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ldm = build_tiny_ldm(folder / "ldm")
    for part in ("vae", "unet", "scheduler"):
        shutil.copytree(ldm / part, folder / "sd" / part)
    words = ["a", "photo", "of", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>"] + [f"{w}</w>" for w in words])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16).save_pretrained(
        folder / "sd" / "tokenizer"
    )
    torch.manual_seed(0)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    ).save_pretrained(folder / "sd" / "text_encoder")
    return folder / "sd"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny LDM in SD's layout (method.ldm=<this folder> with backbone=resnet50_imagenet)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


# DomainBed's ResNet-50 with random weights at the demo world's 32 px (its architecture, offline)
RESNET = ("backbone=resnet50_imagenet", "backbone.pretrained=random", "backbone.image_size=32")


@pytest.fixture(scope="session")
def built_demo_clip(tmp_path_factory) -> Path:
    """The real demo CLIP, built once per test session in its own cache root (about 3 minutes on two
    cores): ``<root>/demo_clip/demo-clip-vit-r<REVISION>.safetensors``, the benchmark it was measured on
    in ``<root>/data/demo_digits`` (where conf/dataset/demo_digits.yaml looks for it with that cache root)."""
    from promptdg_cli.demo.pretrain import RECIPE_REVISION, build_demo_clip

    root = tmp_path_factory.mktemp("demo-clip-cache")
    return build_demo_clip(root / "demo_clip" / f"demo-clip-vit-r{RECIPE_REVISION}.safetensors", "demo-clip-vit")


# --------------------------------------------------------------------- the built-in methods, from their configs
def builtin_method_names() -> list:
    """The built-in methods: each conf/method/<name>.yaml whose method name is its file's (the other
    files are variants of them: dapl_csc, zeroshot_name, ...). Nothing else lists them."""
    import yaml

    from promptdg_cli.config import conf_dir
    from promptdg_cli.methods import builtin_methods

    return sorted(
        c
        for c in builtin_methods()
        if (yaml.safe_load((conf_dir() / "method" / f"{c}.yaml").read_text()) or {}).get("name") == c
    )


def trained_methods() -> list:
    """The built-in methods that train (every one but zero-shot CLIP)."""
    from promptdg_cli.methods import method_class

    return [m for m in builtin_method_names() if method_class({"name": m}).trains]


def tiny_args(method: str, request) -> list:
    """A method's tiny run from its configs alone: its conf/debug/<method>.yaml (``+debug=``) where there
    is one, and the test doubles of its optional parts (the tiny LDM for a method that needs diffusers)."""
    from promptdg_cli.config import conf_dir
    from promptdg_cli.methods import method_class

    args = [f"method={method}"] + ([f"+debug={method}"] if (conf_dir() / "debug" / f"{method}.yaml").is_file() else [])
    if "domainfusion" in method_class({"name": method}).extras:
        args.append(f"method.ldm={request.getfixturevalue('tiny_ldm_dir')}")
    return args
