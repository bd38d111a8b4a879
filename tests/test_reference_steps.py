"""One optimisation step of every trained method against an independent re-derivation.

Each test takes one step through the method's real training (``fit`` and the training loop) on a tiny
random CLIP and a fixed batch, and recomputes the same step here from the official code's equations
(for PromptStyler and DomainFusion, which have no official code, the paper's): the text encoder run
over all 77 positions as the official TextEncoder does (no truncation, no shared prefix), the loss
written out, and the optimiser's first step by hand (SGD with momentum: p - lr (g + wd p); Adam:
p - lr g / (|g| + eps)). The method's own loss functions are never called to build an expectation.
Tolerances come from the computation (``tests/numerics.py``): the method runs the shared-prefix text
path, the reference the 77-position one, and CPU kinds sum in other orders, so a loss agrees to its
magnitude times the float32 bound of the demo CLIP's reductions, a parameter after one step to the
learning rate times its largest gradient times that bound.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from promptdg_cli.data import Features
from promptdg_cli.methods.base import RunEnv
from promptdg_cli.methods.coop import CoOp
from promptdg_cli.methods.dapl import DAPL
from promptdg_cli.methods.dapt import DAPT
from promptdg_cli.methods.domainfusion import DomainFusion
from promptdg_cli.methods.promptstyler import PromptStyler
from promptdg_cli.protocols import TrainData
from promptdg_cli.training import TrainContext
from promptdg_cli.views import Plain
from promptdg_cli.vpt import VisualPrompts

from conftest import method_cfg
from numerics import DEMO_CLIP_DEPTH, DEMO_CLIP_N, adam_first_step_tol, gamma, rel, step_tol, value_tol

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

CPU = torch.device("cpu")
SEED = 1


def text77(clip, emb: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """The official TextEncoder: every one of the 77 positions through the causal transformer, the
    EOT state through ln_final and the projection (unnormalised)."""
    m = clip.model
    x = m.transformer(emb + m.positional_embedding, attn_mask=m.attn_mask)
    x = m.ln_final(x)[torch.arange(len(emb)), eot]
    return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection


def embed(clip, texts):
    tokens = clip.tokenize(texts)
    return clip.token_embedding(tokens).detach().clone(), tokens.argmax(-1)


def spliced(emb: torch.Tensor, at: int, vectors: torch.Tensor) -> torch.Tensor:
    """``emb`` (B, 77, W) with positions at.. replaced by ``vectors`` ((n, W) shared or (B, n, W))."""
    v = vectors.expand(len(emb), -1, -1) if vectors.dim() == 2 else vectors
    return torch.cat([emb[:, :at], v, emb[:, at + v.shape[1]:]], dim=1)


def feats(x, y, domain="d"):
    return Features(x, torch.as_tensor(y), [domain] * len(x), [f"{domain}/{i}.png" for i in range(len(x))])


def logged(tmp_path, key):
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return next(line[key] for line in lines if "epoch" in line)


def ctx_in(tmp_path):
    (tmp_path / "split").mkdir(exist_ok=True)
    return TrainContext(tmp_path, tmp_path / "split", "t", SEED, CPU)


def sgd(p0, grad, lr, wd=0.0):
    return p0 - lr * (grad + wd * p0)  # SGD's first step with momentum: the buffer is the gradient itself


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --------------------------------------------------------------------- CoOp
def test_coop_step(clip, tmp_path):
    names, lr, wd = ["one", "two", "three"], 0.5, 0.01
    cfg = method_cfg("coop", "n_ctx=4", "epochs=1", "warmup_epochs=0", f"lr={lr}", f"weight_decay={wd}", "batch_size=6")
    torch.manual_seed(0)
    m = CoOp(cfg, clip, names, CPU, RunEnv(seed=SEED))
    ctx0 = m.prompt.ctx.detach().clone()
    x, y = unit(6, clip.embed_dim, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    m.fit(TrainData(train=feats(x, y), val=feats(x[:3], y[:3]), train_views=Plain(x)), ctx_in(tmp_path))

    c = ctx0.clone().requires_grad_(True)
    emb, eot = embed(clip, [f"X X X X {n}." for n in names])  # CoOp's "X"*M placeholders, class name, "."
    t = F.normalize(text77(clip, spliced(emb, 1, c), eot), dim=-1)
    loss = F.cross_entropy(clip.model.logit_scale.exp() * x @ t.T, y)
    loss.backward()
    assert logged(tmp_path, "loss") == pytest.approx(loss.item(), abs=value_tol(loss.item()))
    assert torch.allclose(m.prompt.ctx, sgd(ctx0, c.grad, lr, wd), atol=step_tol(lr, c.grad, ctx0))


# --------------------------------------------------------------------- DAPL
def test_dapl_step_and_pseudo_labels(clip, tmp_path):
    # (lr 0.05: the gradients reach ~2, and the shared-prefix and 77-position paths agree to ~1e-6 of them)
    names, words, lr, wd = ["one", "two", "three"], ["printed", "sketch"], 0.05, 0.01
    scale = clip.model.logit_scale.exp()
    # pseudo-labels: zero-shot CLIP with the official naive prompts "a photo of a {class}." at CLIP's scale
    emb, eot = embed(clip, [f"a photo of a {n}." for n in names])
    with torch.no_grad():
        zs = F.normalize(text77(clip, emb, eot), dim=-1)
    xs = unit(6, clip.embed_dim, 4)
    ys = torch.tensor([0, 1, 2, 2, 1, 0])
    xt = F.normalize(zs[[0, 1, 2, 0, 1, 2]] + 0.2 * unit(6, clip.embed_dim, 5), dim=-1)  # near the class prompts
    prob = torch.softmax(scale * xt @ zs.T / 1.0, dim=-1)
    conf, pseudo = prob.max(-1)
    tau = float(conf.sort().values[2] + conf.sort().values[3]) / 2  # half the target images pass
    keep = conf >= tau
    assert int(keep.sum()) == 3  # by hand: the count kept at tau on this constructed batch

    cfg = method_cfg("dapl", "n_ctx=2", "n_dom_ctx=2", "epochs=1", "warmup_epochs=0", f"lr={lr}", f"weight_decay={wd}",
                     "batch_size=6", "target_batch_size=6", f"tau={tau}", "T=1.0", "U=1.0")
    m = DAPL(cfg, clip, names, CPU, RunEnv(seed=SEED))
    target = Features(xt, torch.full((6,), -1), ["sketch"] * 6, [f"s/{i}" for i in range(6)])
    m.fit(
        TrainData(train=feats(xs, ys, "printed"), target=target, train_views=Plain(xs), target_views=Plain(xt)),
        ctx_in(tmp_path),
    )
    assert torch.equal(m.pseudo, pseudo) and int(m.keep.sum()) == 3

    g = torch.Generator().manual_seed(SEED)  # the prompt learner's init: N(0, 0.02^2), ctx then dom
    ctx0 = torch.empty(2, clip.text_width).normal_(0, 0.02, generator=g)
    dom0 = torch.empty(2, 2, clip.text_width).normal_(0, 0.02, generator=g)
    c, d = ctx0.clone().requires_grad_(True), dom0.clone().requires_grad_(True)
    t = []
    # the official PromptLearner's text: "X"*(M1+M2) name + " " + ", a {} image." + "."
    for k, word in enumerate(words):
        emb, eot = embed(clip, ["X X X X " + n + " " + ", a {} image.".format(word) + "." for n in names])
        t.append(F.normalize(text77(clip, spliced(spliced(emb, 1, c), 3, d[k]), eot), dim=-1))
    loss_x = F.cross_entropy(scale * xs @ t[0].T, ys)
    ce_u = F.cross_entropy(scale * xt @ t[1].T, pseudo, reduction="none")
    loss_u = (ce_u * keep.float()).sum() / keep.float().sum()
    (loss_x + loss_u).backward()
    assert logged(tmp_path, "l_src") == pytest.approx(loss_x.item(), abs=value_tol(loss_x.item()))
    assert logged(tmp_path, "l_tgt") == pytest.approx(loss_u.item(), abs=value_tol(loss_u.item()))
    assert torch.allclose(m.prompt.ctx, sgd(ctx0, c.grad, lr, wd), atol=step_tol(lr, c.grad, ctx0))
    assert torch.allclose(m.prompt.dom, sgd(dom0, d.grad, lr, wd), atol=step_tol(lr, d.grad, dom0))


# --------------------------------------------------------------------- DAPT
def test_dapt_step(clip, tmp_path):
    from promptdg_cli.demo.world import generate_dataset

    root = generate_dataset(tmp_path / "world", per_class=1)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    paths = [str(next((root / "sketch" / n).iterdir())) for n in names]
    y = torch.arange(10)
    with torch.no_grad():
        images = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths])
        x = F.normalize(clip.model.encode_image(images), dim=-1)  # the zero-shot image embeddings of the shots
    lr, wd, bv, bt = 0.5, 0.01, 0.7, 0.3
    cfg = method_cfg("dapt", "n_ctx=2", "n_visual=2", "epochs=1", "warmup_epochs=0", f"lr={lr}", f"weight_decay={wd}",
                     "batch_size=10", f"beta_v={bv}", f"beta_t={bt}", "augment=none")
    torch.manual_seed(0)
    m = DAPT(cfg, clip, names, CPU, RunEnv(seed=SEED))
    ctx0 = m.prompt.ctx.detach().clone()
    shots = Features(x, y, ["sketch"] * 10, paths)
    m.fit(TrainData(train=shots, val=shots), ctx_in(tmp_path))

    vp = VisualPrompts(clip.model.visual, 2, False, seed=SEED)  # VPT's init, drawn with the run's seed
    v0 = vp.prompts.detach().clone()
    c = ctx0.clone().requires_grad_(True)
    emb, eot = embed(clip, [f"X X {n}." for n in names])
    w = F.normalize(text77(clip, spliced(emb, 1, c), eot), dim=-1)
    z = F.normalize(vp(images), dim=-1)
    protos = x  # one shot per class: its class mean is itself
    loss = (F.cross_entropy(clip.model.logit_scale.exp() * z @ w.T, y)
            + bv * F.mse_loss(z, protos[y])  # the official L_intra
            + bt * torch.pdist(w, p=2).pow(2).mul(-2.0).exp().mean())  # the official L_inter, t = 2
    loss.backward()
    assert logged(tmp_path, "loss") == pytest.approx(loss.item(), abs=value_tol(loss.item()))
    assert torch.allclose(m.prompt.ctx, sgd(ctx0, c.grad, lr, wd), atol=step_tol(lr, c.grad, ctx0))
    assert torch.allclose(m.visual.prompts, sgd(v0, vp.prompts.grad, lr, wd), atol=step_tol(lr, vp.prompts.grad, v0))


# --------------------------------------------------------------------- PromptStyler
def test_promptstyler_style_steps_and_classifier_step(clip, tmp_path):
    names, lr_s, lr_c, s_, m_ = ["one", "two", "three"], 0.5, 0.3, 5.0, 0.5
    cfg = method_cfg("promptstyler", "n_styles=2", "style_iters=1", "epochs=1", f"style_lr={lr_s}", f"lr={lr_c}",
                     "batch_size=6", f"arcface_s={s_}", f"arcface_m={m_}")
    ps = PromptStyler(cfg, clip, names, CPU, RunEnv(seed=SEED))
    ps.fit(TrainData(), ctx_in(tmp_path))

    emb, eot = embed(clip, ["a x style of a"] + [f"a x style of a {n}" for n in names])
    cemb, ceot = embed(clip, names)
    with torch.no_grad():
        content = F.normalize(text77(clip, cemb, ceot), dim=-1)

    def encode(style):
        f = F.normalize(text77(clip, spliced(emb, 2, style[None]), eot), dim=-1)
        return f[0], f[1:]

    learned, earlier = [], []
    for i in range(2):
        s0 = torch.randn(clip.text_width, generator=torch.Generator().manual_seed(SEED * 1_000_003 + i)) * 0.02
        s = s0.clone().requires_grad_(True)
        f, sc = encode(s)
        l_style = torch.stack([(f @ e).abs() for e in earlier]).mean() if earlier else torch.zeros(())
        l_content = F.cross_entropy(sc @ content.T, torch.arange(3))  # z_mn = cos(style-content_m, content_n)
        (l_style + l_content).backward()
        learned.append((s0 - lr_s * s.grad).detach())
        with torch.no_grad():
            earlier.append(encode(learned[-1])[0])
        # style i sees i earlier ones
        assert torch.allclose(ps.styles[i], learned[-1], atol=step_tol(lr_s, s.grad, s0) * (i + 1))

    with torch.no_grad():
        x = torch.cat([encode(s)[1] for s in learned])  # (K*N, D)
    y = torch.arange(3).repeat(2)
    w0 = torch.empty(3, clip.embed_dim)
    torch.nn.init.xavier_uniform_(w0, generator=torch.Generator().manual_seed(SEED))
    w = w0.clone().requires_grad_(True)
    cos = x @ F.normalize(w, dim=-1).T  # ArcFace on normalised weights: s cos(theta_y + m) for the label
    theta = torch.acos(cos.clamp(-1, 1))
    target = F.one_hot(y, 3).bool()
    assert bool((theta[target] < math.pi - m_).all())  # (the plain branch of the margin)
    logits = s_ * torch.where(target, torch.cos(theta + m_), cos)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    assert logged(tmp_path, "train_loss") == pytest.approx(loss.item(), abs=value_tol(loss.item()))
    assert torch.allclose(ps.classifier.weight, sgd(w0, w.grad, lr_c), atol=step_tol(lr_c, w.grad, w0))


# --------------------------------------------------------------------- DomainFusion
@pytest.fixture(scope="module")
def ldm(clip, tiny_ldm_dir):
    from promptdg_cli.ldm import load_ldm

    return load_ldm(str(tiny_ldm_dir), CPU, "fp32", clip=clip)


def test_domainfusion_noising_and_guidance_by_hand(ldm):
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    abar = ldm.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # the DDPM schedule's cumulative product
    # elementwise: two products and a sum, each rounded once
    noise_tol = gamma(4) * float(z0.abs().max() + eps.abs().max())
    assert torch.allclose(ldm.add_noise(z0, eps, t), abar.sqrt() * z0 + (1 - abar).sqrt() * eps, atol=noise_tol)
    cond, uncond = ldm.encode_text(["a photo of a seven"] * 2), ldm.encode_text([""] * 2)
    with torch.no_grad():
        e_c = ldm.unet(z0, t, encoder_hidden_states=cond).sample
        e_u = ldm.unet(z0, t, encoder_hidden_states=uncond).sample
        got = ldm.predict_noise(z0, t, cond, guidance=3.0)
    # the guided call batches the two UNet passes: the tiny UNet's 3x3 convolutions over 32 channels
    # (288 products) in about 12 blocks of 2 reductions, scaled by the guidance's weights (1 + 2 x 3)
    unet_tol = 7 * rel(n=288, depth=24) * float(e_c.abs().max() + e_u.abs().max())
    assert torch.allclose(got, e_u + 3.0 * (e_c - e_u), atol=unet_tol)  # classifier-free guidance
    assert torch.allclose(ldm.predict_noise(z0, t, cond, guidance=1.0), e_c, atol=unet_tol)


def test_domainfusion_step(clip, tiny_ldm_dir, ldm, tmp_path):
    """The CLIP-encoder variant on a frozen encoder: one DomainBed step (batch_size draws of the one
    source domain and of the synthetic set), cross-entropy over all draws plus latent distillation of
    the distilled draws, Adam's first step."""
    from promptdg_cli.demo.world import generate_dataset

    root = generate_dataset(tmp_path / "world", per_class=1)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    paths = [str(next((root / "photo" / n).iterdir())) for n in names[:4]]
    y = torch.arange(4)
    with torch.no_grad():
        x = F.normalize(
            clip.model.encode_image(torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths])), dim=-1
        )
    lr, lam, guide, b = 0.01, 1.0, 3.0, 2
    cfg = method_cfg(
        "domainfusion",
        f"ldm={tiny_ldm_dir}",
        "train_encoder=false",
        "steps=1",
        "checkpoint_freq=1",
        "augment_every=5",
        f"batch_size={b}",
        "synthetic_fraction=1.0",
        "distill_per_step=2",
        f"distill_weight={lam}",
        f"lr={lr}",
        f"distill_guidance={guide}",
    )
    m = DomainFusion(cfg, clip, names, CPU, RunEnv(seed=SEED))
    m.fit(
        TrainData(train=Features(x, y, ["photo"] * 4, paths), val=Features(x, y, ["photo"] * 4, paths)),
        ctx_in(tmp_path),
    )

    # the step's draws, as DomainBed draws them: b with replacement from the source domain, then b of the
    # synthetic set (round 0: copies of the 4 source images, after them), then a seed per draw
    g = torch.Generator().manual_seed(SEED * 100003)  # the loop's generator of period 0
    src = torch.randint(4, (b,), generator=g)
    syn = torch.randint(4, (b,), generator=g)
    seeds = torch.randint(2**62, (2 * b,), generator=g)
    emb, eot = embed(clip, [f"a photo of a {n}." for n in names])
    with torch.no_grad():
        w0 = F.normalize(text77(clip, emb, eot), dim=-1)  # the head starts as zero-shot CLIP
    w, bias = w0.clone().requires_grad_(True), torch.zeros(10, requires_grad=True)
    feats_all, labels = torch.cat([x[src], x[syn]]), torch.cat([y[src], y[syn]])
    logits = clip.model.logit_scale.exp().item() * (feats_all @ w.T + bias)
    ce = F.cross_entropy(logits, labels)
    # latent distillation of the distilled draws (the 2 source draws: evenly spaced over the source part)
    p = logits[:2].softmax(-1)[torch.arange(2), labels[:2]]
    x01 = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(paths[i]).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            for i in src.tolist()
        ]
    )
    pixels = 2 * (p.view(-1, 1, 1, 1) * x01) - 1  # x(theta) = p x on [0, 1], then the LDM's [-1, 1]
    z = ldm.vae.encode(pixels).latent_dist.mean * ldm.vae.config.scaling_factor
    lo, hi = int(0.02 * 999), int(0.98 * 999)
    t, eps = [], []
    for s in seeds[:2].tolist():  # each distilled draw's t and eps from its own seed
        gd = torch.Generator().manual_seed(s ^ 0x5EED)
        t.append(torch.randint(lo, hi + 1, (1,), generator=gd))
        eps.append(torch.randn((4, 8, 8), generator=gd))
    t, eps = torch.cat(t), torch.stack(eps)
    abar = ldm.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        z_t = abar.sqrt() * z + (1 - abar).sqrt() * eps
        cond = ldm.encode_text([f"a photo of a {names[int(labels[i])]}" for i in range(2)])
        e_c = ldm.unet(z_t, t, encoder_hidden_states=cond).sample
        e_u = ldm.unet(z_t, t, encoder_hidden_states=ldm.encode_text([""] * 2)).sample
        grad_z = (1 - abar) * (e_u + guide * (e_c - e_u) - eps)  # w(t) (eps_hat - eps), w(t) = 1 - abar_t
    l_ld = (grad_z * z).flatten(1).sum(1).mean()  # its gradient w.r.t. z is grad_z / B
    (ce + lam * l_ld).backward()
    assert logged(tmp_path, "ce") == pytest.approx(ce.item(), abs=value_tol(ce.item()))
    # Adam's first step: lr * g / (|g| + eps_adam); the gradient passes the tiny VAE and UNet too
    kw = dict(n=DEMO_CLIP_N, depth=DEMO_CLIP_DEPTH + 24)
    # (the head's starting weights are text features: the method's come through the shared-prefix path)
    for got, p0, grad in ((m.classifier.weight, w0, w.grad), (m.classifier.bias, torch.zeros(10), bias.grad)):
        tol = adam_first_step_tol(lr, grad, p0, param_rel=rel(), **kw)
        diff = (got - (p0 - lr * grad / (grad.abs() + 1e-8))).abs()
        assert bool((diff <= tol).all()), float((diff - tol).max())
        # a wrong step (sign or size of lr) would fail almost everywhere
        assert float((tol < 0.1 * lr).float().mean()) > 0.9
