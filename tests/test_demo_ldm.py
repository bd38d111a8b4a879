"""The demo LDM: a tiny latent diffusion model pretrained by promptdg on the demo world.

The plumbing tests build it with a tiny recipe (a few steps) on the random demo CLIP; the slow test
builds the real one with the real demo CLIP and checks that it draws the digit it is asked for.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from promptdg_cli.demo.ldm import RECIPE_REVISION, build_demo_ldm, demo_ldm_dir, sample_quality
from promptdg_cli.demo.world import CLASSES
from promptdg_cli.ldm import DEMO_MARKER, LatentDiffusion, load_ldm

TINY_RECIPE = {"per_class": 1, "vae_steps": 2, "vae_batch": 8, "unet_steps": 2, "unet_batch": 8, "warmup_steps": 1,
               "quality_per_class": 1, "quality_steps": 2}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, clip):
    root = tmp_path_factory.mktemp("ldm-cache")
    build_demo_ldm(demo_ldm_dir(str(root)), clip, TINY_RECIPE)
    return root


def _mtimes(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_cache_folder(tmp_path, monkeypatch):
    assert demo_ldm_dir(str(tmp_path)) == tmp_path / "demo_ldm" / f"demo-ldm-r{RECIPE_REVISION}"
    monkeypatch.setenv("PROMPTDG_CACHE", str(tmp_path / "env"))
    assert demo_ldm_dir(None) == tmp_path / "env" / "demo_ldm" / f"demo-ldm-r{RECIPE_REVISION}"


def test_tiny_build_layout_and_reuse(tiny_root, clip, capsys):
    folder = demo_ldm_dir(str(tiny_root))
    for part, file in (("vae", "config.json"), ("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        assert (folder / part / file).is_file(), part
    info = json.loads((folder / DEMO_MARKER).read_text())
    assert info["clip_model"] == clip.model_name and info["clip_weights"] == clip.identity()["weights"]
    assert info["revision"] == RECIPE_REVISION and info["recipe"]["unet_steps"] == 2
    assert set(info["quality"]) >= {"top1", "chance", "n"} and info["quality"]["chance"] == 10.0
    assert info["train_s"] > 0
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    before = _mtimes(folder)
    assert build_demo_ldm(folder, clip) == folder  # cached: a no-op, even with the default recipe
    assert _mtimes(folder) == before
    assert "building the demo LDM" not in capsys.readouterr().out


def test_tiny_build_is_deterministic(tiny_root, clip, tmp_path):
    again = build_demo_ldm(tmp_path / "again", clip, TINY_RECIPE)
    folder = demo_ldm_dir(str(tiny_root))
    for part in ("vae", "unet"):
        a = load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(again / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_the_build_is_the_same_whatever_threads_the_caller_uses(clip, tmp_path):
    """make demo builds with two torch threads, a claims arm with one: both must get the same LDM.
    This recipe is large enough for 1 and 3 threads to give other weights without the fixed count."""
    recipe = dict(TINY_RECIPE, vae_batch=16, unet_steps=3, unet_batch=32)
    before = torch.get_num_threads()
    built = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            built.append(build_demo_ldm(tmp_path / f"threads{threads}", clip, recipe))
            assert torch.get_num_threads() == threads  # the caller's count is given back
    finally:
        torch.set_num_threads(before)
    for part in ("vae", "unet"):
        a, b = (load_file(str(f / part / "diffusion_pytorch_model.safetensors")) for f in built)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_load_encode_decode_img2img(tiny_root, clip):
    ldm = load_ldm(str(demo_ldm_dir(str(tiny_root))), torch.device("cpu"), clip=clip)
    assert isinstance(ldm, LatentDiffusion) and ldm.resolution == 32 and ldm.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in ldm.parameters())  # frozen
    assert ldm.unet.config.cross_attention_dim == clip.text_width
    scale = ldm.vae.config.scaling_factor
    assert scale > 0 and scale != 0.18215  # set to 1/std of the trained latents

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ldm.encode(x)
    assert z.shape == (2, 4, 8, 8)
    assert ldm.decode(z).shape == (2, 3, 32, 32)
    # gradients flow to the input (latent distillation), not to the weights
    x.requires_grad_(True)
    ldm.encode(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    prompts = ["a photo of a seven", "a sketch of the number two"]
    cond = ldm.encode_text(prompts)
    assert cond.shape[0] == 2 and cond.shape[-1] == clip.text_width
    t = torch.tensor([10, 900])
    eps = ldm.predict_noise(ldm.add_noise(z.detach(), torch.randn_like(z), t), t, cond, guidance=7.5)
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    g = torch.Generator().manual_seed(0)
    out = ldm.img2img(x.detach(), prompts, strength=0.5, steps=4, guidance=3.0, generator=g)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert ldm.decode(out).shape == (2, 3, 32, 32)


def test_sample_quality_report(tiny_root, clip):
    ldm = load_ldm(str(demo_ldm_dir(str(tiny_root))), torch.device("cpu"), clip=clip)
    q = sample_quality(ldm, clip, list(CLASSES), per_class=1, steps=2, guidance=2.0)
    assert q["n"] == 10 and q["chance"] == 10.0 and 0 <= q["top1"] <= 100


def test_demo_ldm_needs_its_clip(tiny_root, clip):
    from promptdg_cli.config import ConfigError

    with pytest.raises(ConfigError):
        load_ldm(str(demo_ldm_dir(str(tiny_root))), torch.device("cpu"), clip=None)


@pytest.mark.slow
def test_demo_ldm_draws_the_digit_it_is_asked_for(tmp_path_factory):
    """The real demo LDM, conditioned on the real demo CLIP (both built here, ~9 min on two cores):
    its class-conditional samples are classified right by the demo CLIP well above chance."""
    from promptdg_cli.backbone import ClipBackbone
    from promptdg_cli.demo.pretrain import RECIPE_REVISION as CLIP_REVISION

    root = tmp_path_factory.mktemp("real-ldm-cache")
    cfg = SimpleNamespace(
        model="demo-clip-vit",
        pretrained=str(root / "demo_clip" / f"demo-clip-vit-r{CLIP_REVISION}.safetensors"),
        builder="demo_digits",
        cache_dir=None,
        arch="vit",
    )
    clip = ClipBackbone.from_config(cfg)
    ldm = load_ldm(str(build_demo_ldm(demo_ldm_dir(str(root)), clip)), torch.device("cpu"), clip=clip)  # builds it
    info = json.loads((demo_ldm_dir(str(root)) / DEMO_MARKER).read_text())
    q = info["quality"]
    assert q["n"] == 10 * q["per_class"] and q["chance"] == 10.0
    assert q["top1"] >= 2.5 * q["chance"], q
    # the figure is reproducible from the loaded model
    again = sample_quality(ldm, clip, list(CLASSES), per_class=q["per_class"], steps=q["steps"], guidance=q["guidance"])
    assert abs(again["top1"] - q["top1"]) <= 5.0, (again, q)


def test_an_ldm_is_never_used_with_another_clips_text_tower(tiny_root, clip):
    """The folder is keyed by the CLIP's weights, and loading with other weights is refused by name."""
    from promptdg_cli.config import ConfigError

    other = SimpleNamespace(
        model_name=clip.model_name, identity=lambda: {**clip.identity(), "weights": "another-checkpoint"}
    )
    assert demo_ldm_dir(str(tiny_root), clip) != demo_ldm_dir(str(tiny_root), other)
    assert demo_ldm_dir(str(tiny_root), clip).name.startswith(f"demo-ldm-r{RECIPE_REVISION}-")
    with pytest.raises(ConfigError, match="another-checkpoint"):
        load_ldm(str(demo_ldm_dir(str(tiny_root))), torch.device("cpu"), clip=other)


def test_demo_assets_are_built_once_before_the_runs(tmp_path, monkeypatch, random_clip, capsys):
    """python -m promptdg_cli.demo.assets (scripts/claims.py runs it before its parallel arms): the run's
    dataset and CLIP, and with --ldm the demo LDM in the folder a DomainFusion run looks in."""
    from promptdg_cli.demo import assets
    from promptdg_cli.demo import ldm as demo_ldm

    from conftest import TINY

    monkeypatch.setenv("PROMPTDG_CACHE", str(tmp_path))
    built = []

    def fake_build(folder, clip, recipe=None):  # the real build takes minutes
        built.append((folder, clip.model_name))
        (folder / "unet").mkdir(parents=True)
        (folder / DEMO_MARKER).write_text("{}")
        return folder

    monkeypatch.setattr(demo_ldm, "build_demo_ldm", fake_build)
    overrides = [*TINY, f"backbone.pretrained={random_clip}"]
    assert assets.main(["--ldm", *overrides]) == 0
    (folder, model), = built
    assert model == "demo-clip-vit" and folder.parent == tmp_path / "demo_ldm"
    assert folder.name.startswith(f"demo-ldm-r{RECIPE_REVISION}-")  # the CLIP's own LDM (demo_ldm_dir)
    out = capsys.readouterr().out
    assert f"demo asset ready: ldm {folder}" in out and f"backbone {random_clip}" in out
    world = tmp_path / "data" / "demo_digits"
    assert (world / ".complete").is_file() and len(list((world / "photo" / "seven").glob("*.png"))) == 8
    assert assets.prepare_demo_assets(overrides, ldm=True)["ldm"] == str(folder) and len(built) == 1  # found
    assert assets.prepare_demo_assets(overrides)["ldm"] is None  # without --ldm
    assert assets.main(["--ldm", "method.ldm"]) == 2
    assert "'method.ldm' is not a key=value override" in capsys.readouterr().err
