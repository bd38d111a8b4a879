"""VPT visual prompts: exact with no prompts, train only the prompts, VPT init, deep prompts used."""
import pytest
import torch

import promptdg_cli.backbone  # noqa: F401  (the torchvision shim must precede open_clip)

# isort: split
import open_clip

from promptdg_cli.config import ConfigError
from promptdg_cli.vpt import VisualPrompts, prompt_init_bound

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

def random_model(name: str, seed: int = 0):
    """An open_clip model with random weights (never downloads), in eval mode."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    return model.eval()


def images_for(visual, batch: int, seed: int = 1) -> torch.Tensor:
    h, w = visual.image_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def embed_dim(visual) -> int:
    return visual.proj.shape[1]


# ----------------------------------------------------------------- 1. n_prompts=0 is open_clip
@pytest.mark.parametrize("name", ["demo-clip-vit", "ViT-B-32-quickgelu"])
def test_no_prompts_equals_open_clip_visual(name):
    visual = random_model(name).visual
    images = images_for(visual, 2)
    with torch.no_grad():
        ref = visual(images)
        for deep in (False, True):
            ours = VisualPrompts(visual, n_prompts=0, deep=deep)(images)
            assert ours.shape == ref.shape == (2, embed_dim(visual))
            assert torch.allclose(ours, ref, atol=1e-5), (deep, (ours - ref).abs().max())


def test_shallow_prompts_equal_open_clip_transformer_on_spliced_sequence(clip):
    """Independent reference: open_clip's own _embeds and Transformer on [CLS, P, patches]."""
    visual = clip.model.visual
    images = images_for(visual, 3)
    vpt = VisualPrompts(visual, n_prompts=5, seed=3)
    with torch.no_grad():
        x = visual._embeds(images)  # conv1, [CLS], positions, patch dropout, ln_pre
        x = torch.cat([x[:, :1], vpt.prompts[0].expand(3, -1, -1), x[:, 1:]], dim=1)
        x = visual.transformer(x)
        ref = visual.ln_post(x[:, 0]) @ visual.proj  # the [CLS] token, as pool_type='tok'
        ours = vpt(images)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


# ----------------------------------------------------------------- 2. only the prompts learn
@pytest.mark.parametrize("deep", [False, True])
def test_sgd_step_changes_only_the_prompts(clip, deep):
    visual = clip.model.visual
    assert not any(p.requires_grad for p in clip.model.parameters())  # frozen, as ClipBackbone does
    images = images_for(visual, 4)
    with torch.no_grad():
        plain = visual(images)
    vpt = VisualPrompts(visual, n_prompts=4, deep=deep)
    assert [name for name, _ in vpt.named_parameters()] == ["prompts"]  # the backbone is not ours

    backbone_before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    prompts_before = vpt.prompts.detach().clone()
    opt = torch.optim.SGD(vpt.parameters(), lr=1.0)

    out = vpt(images)
    assert out.shape == (4, clip.embed_dim)
    assert not torch.allclose(out, plain, atol=1e-4)  # the prompts change the features
    loss = out.pow(2).sum()
    loss.backward()
    opt.step()

    assert vpt.prompts.grad is not None and vpt.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())
    assert not torch.equal(vpt.prompts.detach(), prompts_before)
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k


def test_grad_wrt_prompts_leaves_trainable_backbone_untouched():
    """Even with requires_grad left on, autograd.grad w.r.t. the prompts accumulates nothing."""
    visual = random_model("demo-clip-vit").visual
    assert all(p.requires_grad for p in visual.parameters())
    vpt = VisualPrompts(visual, n_prompts=3, deep=True)
    out = vpt(images_for(visual, 2))
    (grad,) = torch.autograd.grad(out.sum(), [vpt.prompts])
    assert grad.shape == vpt.prompts.shape and grad.abs().sum() > 0
    assert all(p.grad is None for p in visual.parameters())


# ----------------------------------------------------------------- 3. VPT init
def test_init_bound_and_seed(clip):
    visual = clip.model.visual  # patch 8, width 128
    bound = prompt_init_bound(8, 128)
    assert bound == pytest.approx((6 / (3 * 64 + 128)) ** 0.5)
    assert prompt_init_bound((8, 8), 128) == bound

    a = VisualPrompts(visual, n_prompts=16, deep=True, seed=0).prompts.detach()
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init
    assert a.mean().abs() < 0.1 * bound
    assert torch.equal(a, VisualPrompts(visual, n_prompts=16, deep=True, seed=0).prompts.detach())
    assert not torch.equal(a, VisualPrompts(visual, n_prompts=16, deep=True, seed=1).prompts.detach())
    # the seed alone decides: the global RNG state does not matter
    torch.manual_seed(1234)
    assert torch.equal(a, VisualPrompts(visual, n_prompts=16, deep=True, seed=0).prompts.detach())


# ----------------------------------------------------------------- 4. deep prompts
def test_deep_prompts_have_one_layer_per_block_and_are_used(clip):
    visual = clip.model.visual
    n_blocks = len(visual.transformer.resblocks)
    assert n_blocks == 4
    images = images_for(visual, 2)

    shallow = VisualPrompts(visual, n_prompts=4)
    assert shallow.prompts.shape == (1, 4, 128)
    deep = VisualPrompts(visual, n_prompts=4, deep=True)
    assert deep.prompts.shape == (n_blocks, 4, 128)

    with torch.no_grad():
        before = deep(images)
        # the last block's prompts; not a constant shift, which the blocks' LayerNorm would remove
        deep.prompts[3].add_(torch.randn(4, 128, generator=torch.Generator().manual_seed(5)))
        after = deep(images)
    assert not torch.allclose(before, after, atol=1e-4)

    # independent reference for deep: open_clip's blocks, prompts swapped in before each block
    with torch.no_grad():
        x = visual._embeds(images)
        x = torch.cat([x[:, :1], deep.prompts[0].expand(2, -1, -1), x[:, 1:]], dim=1)
        for i, block in enumerate(visual.transformer.resblocks):
            x = torch.cat([x[:, :1], deep.prompts[i].expand(2, -1, -1), x[:, 5:]], dim=1)
            x = block(x)
        ref = visual.ln_post(x[:, 0]) @ visual.proj
    assert torch.allclose(after, ref, atol=1e-5)

    # shallow lets the prompt outputs flow on, deep swaps in each block's own prompts: they differ
    with torch.no_grad():
        assert not torch.allclose(VisualPrompts(visual, n_prompts=4, deep=True)(images), shallow(images), atol=1e-4)


def test_seq_first_layout_and_grad_checkpointing_give_the_same_features():
    """The (L, B, D) branch and open_clip's grad checkpointing flag are honoured, not ignored."""
    visual = random_model("demo-clip-vit").visual
    images = images_for(visual, 2)
    vpt = VisualPrompts(visual, n_prompts=3, deep=True, seed=2)
    with torch.no_grad():
        ref = vpt(images)
    out = vpt(images)  # with grad: checkpointing only acts when something needs a gradient
    visual.set_grad_checkpointing(True)
    checkpointed = vpt(images)
    (g_ref,) = torch.autograd.grad(out.sum(), [vpt.prompts])
    (g_ckpt,) = torch.autograd.grad(checkpointed.sum(), [vpt.prompts])
    assert torch.allclose(checkpointed, ref, atol=1e-5) and torch.allclose(g_ckpt, g_ref, atol=1e-5)
    visual.set_grad_checkpointing(False)

    visual.transformer.batch_first = False  # as older open_clip ran the stack: sequence first
    for block in visual.transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad():
        seq_first = vpt(images)
        plain = visual(images)
        plain_ours = VisualPrompts(visual, n_prompts=0)(images)
    assert torch.allclose(seq_first, ref, atol=1e-5)
    assert torch.allclose(plain_ours, plain, atol=1e-5)


# ----------------------------------------------------------------- 5. real CLIP ViT configs
@pytest.mark.parametrize(
    "name",
    ["ViT-B-16-quickgelu", pytest.param("ViT-L-14-quickgelu", marks=pytest.mark.slow)],
)
def test_real_vit_configs(name):
    visual = random_model(name).visual
    vpt = VisualPrompts(visual, n_prompts=2, deep=True)
    assert vpt.prompts.shape == (len(visual.transformer.resblocks), 2, visual.conv1.out_channels)
    with torch.no_grad():
        out = vpt(images_for(visual, 1))
    assert out.shape == (1, embed_dim(visual))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------- 6. not a ViT
def test_resnet_visual_is_a_config_error():
    visual = random_model("RN50-quickgelu").visual
    with pytest.raises(ConfigError, match="ViT") as err:
        VisualPrompts(visual)
    assert "ModifiedResNet" in str(err.value) and "vit_b16" in str(err.value)
