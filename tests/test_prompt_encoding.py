"""Shared-prefix prompt encoding equals the plain truncated path (features and gradients), in fp32.

The reference everywhere is ``ClipBackbone.encode_prompts`` on full prompts assembled here by hand
(test_backbone.py checks that path against open_clip's own ``encode_text``). Features agree to 1e-5.
Gradients w.r.t. context vectors of std 0.02 are large (~100: the layer norms divide by that std),
and fp32 rounding alone moves them by ~1e-6 of their size (the plain path truncated vs. all 77
positions differs as much), so gradients agree to 1e-5 of their largest entry; in float64 the two
paths agree to 1e-10.
"""
import copy

import open_clip
import pytest
import torch
from open_clip.transformer import LayerScale
from torch import nn

from promptdg_cli.backbone import ClipBackbone
from promptdg_cli.prompt_encoding import PromptGroups, encode_shared_prefix, length_buckets, supports_shared_prefix

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

TOL = dict(atol=1e-5, rtol=1e-5)
CLASSES = ["cat", "airplane with wings", "seven"]
DOMAINS = ["art", "real world"]


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    name = "ViT-B-16-quickgelu"
    return ClipBackbone(open_clip.create_model(name), open_clip.get_tokenizer(name), None, name, "random", "vit")


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    name = "RN50-quickgelu"
    return ClipBackbone(open_clip.create_model(name), open_clip.get_tokenizer(name), None, name, "random", "rn")


@pytest.fixture(params=["clip", "vit_b16", "rn50"])
def backbone(request):
    """The demo CLIP and the text towers of ViT-B/16 and RN50, all with random weights."""
    return request.getfixturevalue(request.param)


def dapl_pieces(bb, n_ctx=4, n_dom=3, seed=0):
    """DAPL-shaped prompts ``[SOS][ctx][dom_d] {class}, a {domain} image.[EOT]``: the learned vectors,
    the [SOS] embedding, the per-domain per-class suffix embeddings (G, C, S, W) and EOT (G, C)."""
    g = torch.Generator().manual_seed(seed)
    w = bb.text_width
    ctx = (torch.randn(n_ctx, w, generator=g) * 0.02).requires_grad_()
    dom = (torch.randn(len(DOMAINS), n_dom, w, generator=g) * 0.02).requires_grad_()
    placeholder = " ".join(["X"] * (n_ctx + n_dom))
    tokens = bb.tokenize([f"{placeholder} {c}, a {d} image." for d in DOMAINS for c in CLASSES])
    eot = bb.eot_positions(tokens).view(len(DOMAINS), len(CLASSES))
    with torch.no_grad():
        emb = bb.token_embedding(tokens[:, : int(eot.max()) + 1])
    p = 1 + n_ctx + n_dom
    return ctx, dom, emb[0, :1], emb[:, p:].reshape(len(DOMAINS), len(CLASSES), -1, w), eot


def plain(bb, rows, eot, normalize=False):
    """The reference: the plain truncated path on prompts stacked row by row."""
    return bb.encode_prompts(torch.stack(rows), eot.reshape(-1), normalize=normalize)


def assert_grads_close(ours, ref):
    for a, b in zip(ours, ref):
        scale = float(b.abs().max())
        assert scale > 0
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0)


def grads(value, params):
    weights = torch.randn(value.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((value * weights).sum(), params)


def test_supported_towers_take_the_shared_path(backbone):
    assert supports_shared_prefix(backbone.model)


def test_dapl_prompts_features_and_gradients(backbone):
    """Shared context and per-domain context in the prefix, a per-class learned vector in the suffix,
    suffixes that differ per domain and per class (EOT at different positions)."""
    ctx, dom, sos, suffix, eot = dapl_pieces(backbone)
    assert len(set(eot.flatten().tolist())) >= 3  # EOTs really at different positions
    tail = (
        torch.randn(len(CLASSES), 2, backbone.text_width, generator=torch.Generator().manual_seed(2)) * 0.02
    ).requires_grad_()
    eot2 = eot + 2
    rows = [
        torch.cat([sos, ctx, dom[d], tail[c], suffix[d, c]]) for d in range(len(DOMAINS)) for c in range(len(CLASSES))
    ]
    ref = plain(backbone, rows, eot2).view(len(DOMAINS), len(CLASSES), -1)
    prompts = PromptGroups.from_parts([sos, ctx, dom], [tail, suffix], eot2)
    assert prompts.prefix.shape[:2] == (len(DOMAINS), 1 + ctx.shape[0] + dom.shape[1])
    ours = backbone.encode_grouped(prompts, normalize=False)
    torch.testing.assert_close(ours, ref, **TOL)
    assert_grads_close(grads(ours, [ctx, dom, tail]), grads(ref, [ctx, dom, tail]))


def test_normalised_features_and_gradients(clip):
    ctx, dom, sos, suffix, eot = dapl_pieces(clip)
    rows = [torch.cat([sos, ctx, dom[d], suffix[d, c]]) for d in range(len(DOMAINS)) for c in range(len(CLASSES))]
    ref = plain(clip, rows, eot, normalize=True).view(len(DOMAINS), len(CLASSES), -1)
    ours = clip.encode_grouped(PromptGroups.from_parts([sos, ctx, dom], [suffix], eot))
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(DOMAINS), len(CLASSES)), **TOL)
    assert_grads_close(grads(ours, [ctx, dom]), grads(ref, [ctx, dom]))
    # the grouped path is the shared-prefix computation itself, not the fallback
    direct = encode_shared_prefix(clip.model, PromptGroups.from_parts([sos, ctx, dom], [suffix], eot))
    torch.testing.assert_close(torch.nn.functional.normalize(direct, dim=-1), ours, atol=0, rtol=0)


def test_float64_paths_agree_to_rounding(clip):
    """In float64 the fp32 rounding goes away: features and gradients agree to 1e-10."""
    bb = ClipBackbone(copy.deepcopy(clip.model).double(), clip.tokenizer, None, "fp64", "random", "vit")
    ctx, dom, sos, suffix, eot = dapl_pieces(clip)
    ctx, dom = ctx.detach().double().requires_grad_(), dom.detach().double().requires_grad_()
    sos, suffix = sos.double(), suffix.double()
    rows = [torch.cat([sos, ctx, dom[g], suffix[g, c]]) for g in range(len(DOMAINS)) for c in range(len(CLASSES))]
    ref = plain(bb, rows, eot).view(len(DOMAINS), len(CLASSES), -1)
    ours = bb.encode_grouped(PromptGroups.from_parts([sos, ctx, dom], [suffix], eot), normalize=False)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    for a, b in zip(grads(ours, [ctx, dom]), grads(ref, [ctx, dom])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_padding_after_eot_changes_nothing(clip):
    ctx, dom, sos, suffix, eot = dapl_pieces(clip)
    clean = clip.encode_grouped(PromptGroups.from_parts([sos, ctx, dom], [suffix], eot))
    noisy = suffix.clone()
    after = torch.arange(suffix.shape[2]) > (eot - 1 - ctx.shape[0] - dom.shape[1])[..., None]  # (G, C, S)
    noisy[after] = torch.randn(int(after.sum()), clip.text_width)
    assert after.any() and not after.all()
    torch.testing.assert_close(
        clip.encode_grouped(PromptGroups.from_parts([sos, ctx, dom], [noisy], eot)), clean, **TOL
    )


def test_one_suffix_set_for_all_groups_and_one_prefix_for_all_groups(clip):
    ctx, dom, sos, suffix, eot = dapl_pieces(clip)
    d, c = len(DOMAINS), len(CLASSES)
    # the class suffixes of domain 0 in every group: suffix (1, C, S, W), eot (C,)
    rows = [torch.cat([sos, ctx, dom[g], suffix[0, k]]) for g in range(d) for k in range(c)]
    ref = plain(clip, rows, eot[0].repeat(d))
    ours = clip.encode_grouped(PromptGroups.from_parts([sos, ctx, dom], [suffix[:1]], eot[0]), normalize=False)
    torch.testing.assert_close(ours.view(d * c, -1), ref, **TOL)
    assert_grads_close(grads(ours.view(d * c, -1), [ctx, dom]), grads(ref, [ctx, dom]))
    # one prefix (1, P, W) for per-group suffixes (G, C, S, W)
    rows = [torch.cat([sos, ctx, dom[0], suffix[g, k]]) for g in range(d) for k in range(c)]
    ours = clip.encode_grouped(PromptGroups.from_parts([sos, ctx, dom[0]], [suffix], eot), normalize=False)
    assert ours.shape[:2] == (d, c)
    torch.testing.assert_close(ours.view(d * c, -1), plain(clip, rows, eot), **TOL)


def test_class_specific_context_has_no_shared_prefix(backbone):
    """Every class its own context: the prefix is [SOS] alone and the contexts sit in the suffix."""
    ctx, _, sos, suffix, eot = dapl_pieces(backbone, n_ctx=5, n_dom=0)
    csc = (
        torch.randn(len(CLASSES), 5, backbone.text_width, generator=torch.Generator().manual_seed(3)) * 0.02
    ).requires_grad_()
    rows = [torch.cat([sos, csc[c], suffix[0, c]]) for c in range(len(CLASSES))]
    ref = plain(backbone, rows, eot[0])
    ours = backbone.encode_grouped(PromptGroups.from_parts([sos], [csc, suffix[0]], eot[0]), normalize=False)[0]
    torch.testing.assert_close(ours, ref, **TOL)
    assert_grads_close(grads(ours, [csc]), grads(ref, [csc]))


class Wrapped(nn.Module):
    """A text block the shared-prefix path does not know."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, attn_mask=None):
        return self.inner(x, attn_mask=attn_mask)


def test_unknown_blocks_fall_back_to_the_plain_path_exactly(clip):
    model = copy.deepcopy(clip.model)
    model.transformer.resblocks = nn.ModuleList(Wrapped(b) for b in model.transformer.resblocks)
    bb = ClipBackbone(model, clip.tokenizer, None, "wrapped", "random", "vit")
    assert not supports_shared_prefix(model)
    ctx, dom, sos, suffix, eot = dapl_pieces(bb)
    prompts = PromptGroups.from_parts([sos, ctx, dom], [suffix], eot)
    ours = bb.encode_grouped(prompts, normalize=False)
    rows = [torch.cat([sos, ctx, dom[d], suffix[d, c]]) for d in range(len(DOMAINS)) for c in range(len(CLASSES))]
    assert torch.equal(ours.view(len(rows), -1), plain(bb, rows, eot))
    # and the wrapped model computes what the original does
    torch.testing.assert_close(ours, clip.encode_grouped(prompts, normalize=False), **TOL)


def test_linear_projection_and_layer_scale(clip):
    """Other open_clip options of the same blocks: a Linear text projection with bias, LayerScale."""
    model = copy.deepcopy(clip.model)
    w, d = clip.text_width, clip.embed_dim
    torch.manual_seed(4)
    del model.text_projection  # a Parameter in these configs
    model.text_projection = nn.Linear(w, d)
    for b in model.transformer.resblocks:
        b.ls_1, b.ls_2 = LayerScale(w, 0.7), LayerScale(w, 1.3)
    bb = ClipBackbone(model, clip.tokenizer, None, "variant", "random", "vit")
    assert supports_shared_prefix(model)
    ctx, dom, sos, suffix, eot = dapl_pieces(bb)
    rows = [torch.cat([sos, ctx, dom[g], suffix[g, c]]) for g in range(len(DOMAINS)) for c in range(len(CLASSES))]
    ref = plain(bb, rows, eot)
    ours = bb.encode_grouped(PromptGroups.from_parts([sos, ctx, dom], [suffix], eot), normalize=False)
    torch.testing.assert_close(ours.view(len(rows), -1), ref, **TOL)
    assert not torch.allclose(ref, plain(clip, rows, eot), atol=1e-3)  # the variant really differs


TEMPLATES = ["a photo of a {}.", "itap of a {}.", "{} in a sketch", "a bad photo of the {} with a long tail."]


@pytest.mark.parametrize("template", TEMPLATES)
def test_zero_shot_templates_from_text_equal_encode_text(clip, template):
    texts = [template.format(c) for c in CLASSES + ["x"]]
    tokens = clip.tokenize(texts)
    ref = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1)  # open_clip, all 77 positions
    torch.testing.assert_close(clip.encode_text_grouped(texts), ref, **TOL)
    torch.testing.assert_close(clip.encode_text_grouped(texts), clip.encode_text(texts), **TOL)


def test_common_prefix_of_texts():
    """The prefix is the leading tokens common to all texts, never past the first EOT."""
    tokens = torch.tensor([[9, 4, 5, 6, 99, 0], [9, 4, 5, 7, 8, 99], [9, 4, 5, 6, 8, 99]])
    emb = torch.randn(3, 6, 2)
    g = PromptGroups.from_tokens(emb, tokens, tokens.argmax(1))
    assert g.prefix_len == 3 and g.suffix.shape == (1, 3, 3, 2)
    assert torch.equal(g.eot, torch.tensor([[4, 5, 5]]))
    same = torch.tensor([[9, 4, 99, 0], [9, 4, 99, 0]])
    # EOT stays in the suffix
    assert PromptGroups.from_tokens(torch.randn(2, 4, 2), same, same.argmax(1)).prefix_len == 2


def assert_style_word_path_equals_plain(clip, g: PromptGroups, seed: int):
    """A learned style word at position 2 ("[SOS] a S style of a ..."): the grouped path's features and the
    word's gradient equal the plain path's on the same prompts assembled by hand."""
    style = (torch.randn(clip.text_width, generator=torch.Generator().manual_seed(seed)) * 0.02).requires_grad_()
    pre = g.prefix[0]
    prompts = PromptGroups.from_parts([pre[:2], style[None], pre[3:]], [g.suffix], g.eot)
    full, eot = g.full()
    ref = clip.encode_prompts(torch.cat([full[:, :2], style.expand(full.shape[0], 1, -1), full[:, 3:]], dim=1), eot)
    ours = clip.encode_grouped(prompts)[0]
    torch.testing.assert_close(ours, ref, **TOL)
    assert_grads_close(grads(ours, [style]), grads(ref, [style]))


def test_style_prompt_and_style_content_prompts(clip):
    """PromptStyler's batch: "a S style of a" (EOT right after the shared prefix) and "a S style of a
    {class}", the learned style word inside the shared prefix."""
    texts = ["a X style of a"] + [f"a X style of a {c}" for c in CLASSES]
    g = clip.group_texts(texts)
    assert g.prefix_len == 6 and int(g.eot[0, 0]) == 6  # [SOS] a X style of a | [EOT]
    assert_style_word_path_equals_plain(clip, g, 5)


def test_length_buckets_minimise_the_positions_run():
    # lengths 1 x 6, 2 x 3, 7 x 1; prefix pass 5, one group. By hand: one bucket 5 + 10*7 = 75;
    # {1,2} {7}: (5 + 9*2) + (5 + 7) = 35; {1} {2} {7}: 11 + 11 + 12 = 34; {1} {2,7}: 11 + 5 + 4*7 = 44
    lengths = [1, 2, 1, 7, 1, 2, 1, 1, 2, 1]
    assert length_buckets(lengths, prefix_cost=5, groups=1) == [[0, 2, 4, 6, 7, 9], [1, 5, 8], [3]]
    # a dear prefix pass (5 -> 40): {1,2} {7}: 58 + 47 = 105; {1} {2} {7}: 46 + 46 + 47 = 139; one: 110
    assert length_buckets(lengths, prefix_cost=40, groups=1) == [[0, 1, 2, 4, 5, 6, 7, 8, 9], [3]]
    # equal lengths: one bucket
    assert length_buckets([3, 3, 3], prefix_cost=0, groups=4) == [[0, 1, 2]]


def test_style_content_prompts_of_many_lengths_run_in_buckets(clip):
    """Class names of 1 to 8 tokens: the prompts split into buckets (checked), and the features and the
    style word's gradient equal the plain path's."""
    names = [
        "cat",
        "dog",
        "car",
        "tree",
        "the eiffel tower at night",
        "sun",
        "pen",
        "a very long and strange name of a thing",
    ]
    texts = [f"a X style of a {c}" for c in names]
    g = clip.group_texts(texts)
    lengths = (g.eot[0] - g.prefix_len + 1).tolist()
    assert len(length_buckets(lengths, g.prefix_len, 1)) >= 2
    assert_style_word_path_equals_plain(clip, g, 6)


def test_bad_shapes_are_named():
    w = 4
    with pytest.raises(ValueError, match=r"eot ranges over \[2, 3\].*positions \[3, 5\]"):
        PromptGroups(torch.zeros(1, 3, w), torch.zeros(1, 2, 3, w), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"valid: \(2,\), \(1, 2\) or \(3, 2\)"):
        PromptGroups(torch.zeros(3, 3, w), torch.zeros(1, 2, 3, w), torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="group counts be equal or 1"):
        PromptGroups(torch.zeros(3, 3, w), torch.zeros(2, 2, 3, w), torch.tensor([3, 4]))
