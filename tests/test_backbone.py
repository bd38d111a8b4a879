"""The backbone: truncated text path equals the full computation; weights errors are clear and fast."""
import time
from types import SimpleNamespace

import pytest
import torch

from promptdg_cli.backbone import ClipBackbone, WeightsNotFound, resolve_weights
from promptdg_cli.config import ConfigError

# floats whose last bits depend on the CPU kind: .ci/run runs these again as AVX2 and plain CPUs sum
pytestmark = pytest.mark.numerics

PROMPTS = ["a photo of a seven.", "seven", "a sketch of the number seven drawn with a very thick pencil on paper"]


def test_truncated_text_equals_open_clip_encode_text(clip):
    tokens = clip.tokenize(PROMPTS)
    ref = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1)  # open_clip, all 77 positions
    ours = clip.encode_text(tokens)
    assert torch.allclose(ours, ref, atol=1e-5)
    # and the truncation really drops positions: the longest prompt is far shorter than 77
    assert int(clip.eot_positions(tokens).max()) + 1 < 25


def test_truncated_prompt_path_equals_full_length_with_learned_vectors(clip):
    torch.manual_seed(0)
    tokens = clip.tokenize(["X X X X seven.", "X X X X one.", "X X X X the number four."])
    emb = clip.token_embedding(tokens).detach()
    ctx = torch.randn(4, clip.text_width, requires_grad=True)
    spliced = torch.cat([emb[:, :1], ctx.expand(3, -1, -1), emb[:, 5:]], dim=1)  # (3, 77, W)
    eot = clip.eot_positions(tokens)
    short = clip.encode_prompts(spliced, eot, truncate=True)
    full = clip.encode_prompts(spliced, eot, truncate=False)
    assert torch.allclose(short, full, atol=1e-5)
    # gradients through the learned vectors agree too
    g_short, = torch.autograd.grad(short.sum(), ctx)
    g_full, = torch.autograd.grad(full.sum(), ctx)
    assert torch.allclose(g_short, g_full, atol=1e-5)


def test_backbone_is_frozen(clip):
    assert not any(p.requires_grad for p in clip.model.parameters())


def test_missing_checkpoint_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "clip.pt"
    with pytest.raises(WeightsNotFound, match="no checkpoint file there"):
        resolve_weights("ViT-B-16-quickgelu", str(missing), None)


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(WeightsNotFound, match="Valid tags: .*openai"):
        resolve_weights("ViT-B-16-quickgelu", "laion5b_nonexistent", None)


def test_openai_tag_offline_fails_fast_with_where_to_put_it(tmp_path):
    t = time.time()
    with pytest.raises(WeightsNotFound) as e:
        resolve_weights("ViT-B-16-quickgelu", "openai", str(tmp_path))  # empty cache dir, HF_HUB_OFFLINE=1
    assert time.time() - t < 5
    msg = str(e.value)
    assert "huggingface-cli download timm/vit_base_patch16_clip_224.openai" in msg
    assert "backbone.pretrained=/path/to/checkpoint" in msg


def test_cached_tag_file_is_found(tmp_path, random_clip):
    # open_clip's URL cache layout: <cache_dir>/<basename of the URL>
    import open_clip

    cfg = open_clip.get_pretrained_cfg("RN50-quickgelu", "openai")
    (tmp_path / cfg["url"].rsplit("/", 1)[1]).write_bytes(b"x")
    path, _, wid = resolve_weights("RN50-quickgelu", "openai", str(tmp_path))
    assert path.endswith("RN50.pt") and wid == "RN50-quickgelu:openai"


def test_unknown_model_name():
    cfg = SimpleNamespace(model="ViT-Q-99", pretrained="none", builder=None, cache_dir=None, arch="vit")
    with pytest.raises(ConfigError, match="backbone.model='ViT-Q-99'"):
        ClipBackbone.from_config(cfg)
