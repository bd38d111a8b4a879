"""The LDM's numbers in a run (ldm.py): its own dtype inside the run's autocast, the VAE in fp32 where
its config says so and wherever a gradient goes through it, and NaN/inf stopping the run with the
step named instead of black images (a tiny LDM with random weights, on the CPU)."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from promptdg_cli.ldm import LatentDiffusion, NonFiniteError, load_ldm
from promptdg_cli.methods.domainfusion import DomainFusion, latent_distillation_loss
from promptdg_cli.training import make_files

from conftest import method_cfg


@pytest.fixture
def ldm(tiny_ldm_dir, clip):
    # (fp32 on the CPU; a fresh copy: a test may break it)
    return load_ldm(str(tiny_ldm_dir), torch.device("cpu"), clip=clip)


def test_the_ldm_keeps_its_dtype_inside_a_runs_autocast(ldm):
    """A bf16 autocast around the step (backbone.precision=bf16 on CUDA; the CPU's autocast here) does
    not recast the LDM: its calls give the numbers they give outside."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z_t, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 600])
    cond = ldm.encode_text(["a photo of a one", "a photo of a two"])

    def calls():
        return ldm.encode(x), ldm.decode(z_t), ldm.predict_noise(z_t, t, cond, guidance=3.0)

    plain = calls()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = calls()
        recast = ldm.unet(z_t, t, encoder_hidden_states=cond).sample  # (what autocast does to a bare call)
    assert all(torch.equal(a, b) for a, b in zip(plain, inside))
    assert recast.dtype == torch.bfloat16


def _parts(tiny_ldm_dir, force_upcast):
    vae = AutoencoderKL.from_pretrained(tiny_ldm_dir / "vae", force_upcast=force_upcast)
    unet = UNet2DConditionModel.from_pretrained(tiny_ldm_dir / "unet")
    return vae.half(), unet.half(), DDPMScheduler.from_pretrained(tiny_ldm_dir / "scheduler")


@pytest.mark.parametrize("force_upcast", [True, False])
def test_an_fp16_ldm_runs_its_vae_in_fp32_where_its_config_asks_and_where_a_gradient_goes(tiny_ldm_dir, force_upcast):
    vae, unet, sched = _parts(tiny_ldm_dir, force_upcast)
    ldm = LatentDiffusion(
        vae, unet, sched, lambda prompts: torch.zeros(len(prompts), 16, 128), "tiny", dtype=torch.float16
    )
    assert next(ldm.unet.parameters()).dtype == torch.float16
    assert ldm.vae_dtype == (torch.float32 if force_upcast else torch.float16)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    z = ldm.encode(x)  # differentiated: an fp32 encoder whatever the config says
    z.sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert (getattr(ldm, "_vae32", None) is None) == force_upcast  # (an fp32 VAE needs no fp32 copy)
    # the fp32 encoder's latents equal those of the fp16 VAE upcast by hand
    ref = AutoencoderKL.from_pretrained(tiny_ldm_dir / "vae").half().float()
    want = ref.encode(x.detach()).latent_dist.mean * ref.config.scaling_factor
    torch.testing.assert_close(z.detach(), want)


def test_nan_in_latent_distillation_stops_the_run_naming_the_step(ldm):
    with torch.no_grad():
        next(ldm.unet.parameters()).fill_(float("nan"))  # a broken UNet: its ε̂ is NaN
    p = torch.tensor([0.5, 0.9], requires_grad=True)
    with pytest.raises(
        NonFiniteError,
        match=r"latent distillation, period 1 step 7: the latent gradient .* NaN or inf in 2 of 2 items "
        r"\(the LDM runs in float32\)\. method\.ldm_dtype=fp32",
    ):
        latent_distillation_loss(ldm, p, torch.rand(2, 3, 32, 32), ldm.encode_text(["a", "b"]), torch.tensor([10, 500]),
                                 torch.randn(2, 4, 8, 8), 3.0, where="latent distillation, period 1 step 7")


def test_nan_latents_are_never_saved_as_black_images(ldm, clip, tiny_ldm_dir, tmp_path):
    from PIL import Image

    paths = []
    for k in range(2):
        paths.append(tmp_path / f"in{k}.png")
        Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(paths[-1])
    cfg = method_cfg(
        "domainfusion",
        f"ldm={tiny_ldm_dir}",
        "candidates=2",
        "img2img_steps=4",
        "generate_batch=2",
        "train_encoder=false",
    )
    method = DomainFusion(cfg, clip, [f"class {i}" for i in range(10)], torch.device("cpu"))
    method._ldm = ldm
    with torch.no_grad():
        next(ldm.unet.parameters()).fill_(float("nan"))
    outs = [tmp_path / "round1" / f"{k:06d}.png" for k in range(2)]
    with pytest.raises(
        NonFiniteError,
        match=rf"augmenting {paths[0]} and 1 more: the img2img candidates' latents: NaN or inf in 2 of 2",
    ):
        method.write_round([str(p) for p in paths], [0, 1], outs, 1, "round 1", make_files)
    assert not any(o.exists() for o in outs)
