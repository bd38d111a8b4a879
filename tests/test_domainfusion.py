"""DomainFusion: the latent-distillation gradient, a frozen LDM, the style/content fusion, the
generated-image count, and ``promptdg generate`` (resumable, never rewriting a finished set).

All on a tiny LDM with random weights (a diffusers VAE and UNet built from configs and saved to a
temporary folder) conditioned on the random demo CLIP's text tower."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from promptdg_cli import synthetic
from promptdg_cli.ldm import LDMNotFound, load_ldm, locate, to_ldm_pixels
from promptdg_cli.methods import domainfusion as dfm
from promptdg_cli.methods.domainfusion import darken, fuse_candidates, latent_distillation_loss, style_content

from conftest import results

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

@pytest.fixture(scope="module")
def ldm(tiny_ldm_dir, clip):
    return load_ldm(str(tiny_ldm_dir), torch.device("cpu"), clip=clip)


# --------------------------------------------------------------------- latent distillation
def test_distillation_gradient_is_w_t_times_eps_error_pushed_through_vae_and_darkening(ldm, clip):
    torch.manual_seed(0)
    B = 3
    x01 = torch.rand(B, 3, 32, 32)
    y = torch.tensor([1, 4, 7])
    clf = torch.nn.Linear(3 * 32 * 32, 10)  # θ: a tiny classifier on the pixels
    t = torch.tensor([100, 500, 900])
    noise = torch.randn(B, 4, 8, 8)
    cond = ldm.encode_text([f"a photo of a {n}" for n in ("one", "four", "seven")])

    def p_of(theta_clf):
        return theta_clf(x01.flatten(1)).softmax(-1).gather(1, y[:, None]).squeeze(1)

    loss, g = latent_distillation_loss(ldm, p_of(clf), x01, cond, t, noise, guidance=3.0)
    loss.backward()
    got = [clf.weight.grad.clone(), clf.bias.grad.clone()]

    # by hand: ε̂ at the noised latent, w(t) = 1 − ᾱ_t, g = w (ε̂ − ε), then J_θ(z)ᵀ g / B with autograd
    z = ldm.encode(to_ldm_pixels(darken(x01, p_of(clf))))
    a = ldm.alphas_cumprod()[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z.detach() + (1 - a).sqrt() * noise
    eps_hat = ldm.predict_noise(z_t, t, cond, guidance=3.0)
    g_hand = (1 - a) * (eps_hat - noise)
    torch.testing.assert_close(g, g_hand)
    want = torch.autograd.grad(z, [clf.weight, clf.bias], grad_outputs=g_hand / B)
    for a_, b_ in zip(got, want):  # float32 summation order differs: tolerance relative to the largest entry
        torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-5 * b_.abs().max().item())
    assert got[0].abs().sum() > 0  # the gradient does reach θ

    # and through the darkening: ∂L/∂p_b = <J_E(2 p x_b − 1)ᵀ g_b / B, 2 x_b> (chain rule by hand)
    p = p_of(clf).detach().requires_grad_(True)
    loss_p, _ = latent_distillation_loss(ldm, p, x01, cond, t, noise, guidance=3.0)
    (dp,) = torch.autograd.grad(loss_p, p)
    for b in range(B):
        xb = to_ldm_pixels(p[b].detach() * x01[b : b + 1]).requires_grad_(True)
        (v,) = torch.autograd.grad(ldm.encode(xb), xb, grad_outputs=g_hand[b : b + 1] / B)  # J_Eᵀ g_b / B
        assert dp[b].item() == pytest.approx((v * 2 * x01[b : b + 1]).sum().item(), rel=1e-4, abs=1e-9)


def test_no_gradient_or_update_reaches_the_ldm(ldm):
    before = {k: v.clone() for k, v in ldm.state_dict().items()}
    assert not any(p.requires_grad for p in ldm.parameters())
    head = torch.nn.Linear(8, 10)
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    x01 = torch.rand(2, 3, 32, 32)
    p = head(torch.randn(2, 8)).softmax(-1)[:, 3]
    loss, _ = latent_distillation_loss(
        ldm,
        p,
        x01,
        ldm.encode_text(["a photo of a three"] * 2),
        torch.tensor([10, 700]),
        torch.randn(2, 4, 8, 8),
        guidance=7.5,
    )
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in ldm.parameters())
    assert all(torch.equal(v, before[k]) for k, v in ldm.state_dict().items())


def test_constant_weighting_and_bad_key():
    ac = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 999])
    assert torch.allclose(dfm.distill_weighting(ac, t, "1-alpha"), torch.tensor([0.01, 0.99]))
    assert torch.equal(dfm.distill_weighting(ac, t, "constant"), torch.ones(2))
    with pytest.raises(Exception, match="method.weighting"):
        dfm.distill_weighting(ac, t, "snr")


# --------------------------------------------------------------------- style / content
def test_style_content_decomposition_recomposes():
    z = torch.randn(2, 4, 8, 8) * 3 + 1
    mu, sigma, c = style_content(z)
    assert mu.shape == (2, 4, 1, 1) and sigma.shape == (2, 4, 1, 1)
    torch.testing.assert_close(c * sigma + mu, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.mean(dim=(-2, -1)), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_fusion_takes_the_farthest_style_and_the_closest_content():
    torch.manual_seed(0)
    B = 2
    content_in = style_content(torch.randn(B, 4, 8, 8))[2]
    z_in = content_in * 1.0 + 0.0  # style (0, 1)
    # candidate k: content = input content + noise of scale noise[k]; style = (shift[k], scale[k])
    noise = [0.8, 0.05, 0.5]  # candidate 1 keeps the content best
    shift = [0.3, 0.1, 2.0]  # candidate 2 moves the style farthest
    scale = [1.2, 1.0, 3.0]
    cands = []
    for k in range(3):
        c = style_content(content_in + noise[k] * torch.randn(B, 4, 8, 8))[2]
        cands.append(c * scale[k] + shift[k])
    cands = torch.stack(cands)
    fused, si, ci = fuse_candidates(z_in, cands)
    assert si.tolist() == [2, 2] and ci.tolist() == [1, 1]
    mu_f, s_f, c_f = style_content(fused)
    mu_2, s_2, _ = style_content(cands[2])
    _, _, c_1 = style_content(cands[1])
    torch.testing.assert_close(mu_f, mu_2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_f, s_2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c_f, c_1, atol=1e-3, rtol=1e-3)


def test_selection_is_per_image():
    z_in = torch.zeros(2, 1, 2, 2)
    z_in[:, 0, 0, 0] = 1.0
    a = z_in.clone()  # same content and style as the inputs
    b = z_in.clone() * 5 + 3  # same content, far style
    cands = torch.stack([torch.stack([a[0], b[1]]), torch.stack([b[0], a[1]])])  # (2, B, ...)
    _, si, _ = fuse_candidates(z_in, cands)
    assert si.tolist() == [1, 0]


# --------------------------------------------------------------------- loading
def test_missing_ldm_fails_fast_with_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LDMNotFound, match="huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5"):
        locate("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(LDMNotFound, match="no such folder"):
        locate(str(tmp_path / "nothing" / "here"))
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    with pytest.raises(LDMNotFound, match="lacks unet/, text_encoder/, tokenizer/, scheduler/"):
        load_ldm(str(tmp_path / "sd"), torch.device("cpu"))


def test_stable_diffusion_layout_loads_with_a_transformers_text_encoder(tiny_sd_dir):
    """The SD v1.x folder layout (vae, unet, text_encoder, tokenizer, scheduler), tiny and random
    (conftest.build_tiny_sd)."""
    assert {p.name for p in tiny_sd_dir.iterdir()} >= {"vae", "unet", "text_encoder", "tokenizer", "scheduler"}
    ldm = load_ldm(str(tiny_sd_dir), torch.device("cpu"))
    states = ldm.encode_text(["a photo of a one", ""])
    assert states.shape == (2, 16, 128)
    assert not any(p.requires_grad for p in ldm.parameters())
    z = ldm.img2img(torch.zeros(1, 3, 32, 32), ["a photo of a one"], 0.5, 4, 2.0, torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)


# --------------------------------------------------------------------- end to end
def _args(ldm_dir, *extra):
    return (
        "method=domainfusion",
        f"method.ldm={ldm_dir}",
        "method.steps=3",
        "method.checkpoint_freq=2",
        "method.augment_every=1",
        "method.candidates=2",
        "method.img2img_steps=4",
        "method.batch_size=16",
        "method.train_encoder=false",
        *extra,
    )


def test_train_end_to_end_counts_generated_images(run_cli, tiny_ldm_dir):
    code, out, err, out_root = run_cli("train", *_args(tiny_ldm_dir, "target=printed"))
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["status"] == "finished" and rec["method"] == "domainfusion"
    run_dir = Path(rec["run_dir"])
    (split,) = [json.loads(p.read_text()) for p in run_dir.glob("splits/*/result.json")]
    n_syn = split["n_train"]  # synthetic_fraction 1: one synthetic copy per source training image
    # evaluation periods of 1 and 2 steps, a round every period: one round (before period 1), 2 candidates per image
    assert rec["generated_images"] == 1 * n_syn * 2
    assert rec["synthetic_images"] == n_syn
    assert len(list(run_dir.glob("splits/*/synthetic/round1/*.png"))) == n_syn
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(l.get("ld_grad_rms", 0) > 0 for l in lines)  # the distillation ran


def test_generate_writes_a_domainbed_set_resumes_and_never_rewrites(run_cli, tiny_ldm_dir, monkeypatch, tmp_path):
    args = ("generate", *_args(tiny_ldm_dir, "target=sketch", "method.generate_batch=8"))
    # reference: uninterrupted
    code, out, err, out_root = run_cli(*args)
    assert code == 0, err
    (ref_info,) = [json.loads(p.read_text()) for p in out_root.rglob("generated.json")]
    ref_dir = Path(ref_info["dataset_root"])
    ref = {p.relative_to(ref_dir): p.read_bytes() for p in ref_dir.rglob("*.png") if "sketch" not in p.parts}
    assert ref_info["sources"] == ["handwritten", "printed", "photo"]
    assert len(ref) == ref_info["images"] == 3 * 10 * 8
    assert {p.parts[1] for p in ref} == {"handwritten", "printed", "photo"}  # <folder>/<domain>/<class>/<img>
    assert (ref_dir / "demo_digits" / "sketch").is_symlink()

    # interrupted after two batches, then resumed in the same folder
    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "second"))
    real = synthetic.save_png
    calls = []

    def dying(x, path):
        if len(calls) == 16:
            raise KeyboardInterrupt("killed")
        calls.append(path)
        real(x, path)

    monkeypatch.setattr(synthetic, "save_png", dying)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*args)
    monkeypatch.setattr(synthetic, "save_png", real)
    partial = list((tmp_path / "second").rglob("*.png"))
    assert len(partial) == 16 and not list((tmp_path / "second").rglob("generated.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in partial}
    code, out, err, _ = run_cli(*args)
    assert code == 0, err
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # the finished batches were kept
    (info,) = [json.loads(p.read_text()) for p in (tmp_path / "second").rglob("generated.json")]
    got_dir = Path(info["dataset_root"])
    got = {p.relative_to(got_dir): p.read_bytes() for p in got_dir.rglob("*.png") if "sketch" not in p.parts}
    assert got == ref  # byte-identical to the uninterrupted set

    # a finished set is never rewritten
    before = {p: p.stat().st_mtime_ns for p in got_dir.rglob("*.png")}
    code, out, err, _ = run_cli(*args)
    assert code == 0 and "not rewriting" in out
    assert {p: p.stat().st_mtime_ns for p in got_dir.rglob("*.png")} == before


def test_generate_refuses_methods_that_do_not_generate(run_cli):
    code, out, err, _ = run_cli("generate", "method=coop")
    assert code != 0 and "domainfusion" in err
