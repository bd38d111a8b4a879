"""VPT-style visual prompts for open_clip's ViT image encoder.

Visual Prompt Tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022), as DAPT (Cho et al.,
"Distribution-Aware Prompt Tuning for Vision-Language Models", ICCV 2023) uses it on CLIP: the
image encoder stays frozen and a few learnable vectors ("prompt tokens") are added to the token
sequence the transformer sees. Self-attention is global, so every patch token and the [CLS] token
can attend to the prompts; the prompts steer the features without changing a single weight.

Insertion point (VPT's "prepend" location). The embedding layer of the ViT is run exactly as
open_clip 3.3.0's ``VisionTransformer._embeds`` runs it: conv1 patchify, [CLS] token, positional
embedding, patch dropout, ``ln_pre``. The ``n`` prompt tokens are then placed right after [CLS]:

    x_0 = [CLS, P_1 .. P_n, E_1 .. E_m]          (E: the m patch embeddings)

so the prompts get no positional embedding, are never dropped by patch dropout, and do not go
through ``ln_pre`` (they are inputs of the first block, like every deep prompt below).

VPT-Shallow (``deep=False``): prompts only enter the first block, ``P`` is (1, n, d); the outputs
of block i at the prompt positions become the prompt inputs of block i+1.

VPT-Deep (``deep=True``): every block i has its own prompts ``P^i``, ``P`` is (L, n, d). Block 0
gets ``P^0`` inserted as above; before block i >= 1 the n outputs of block i-1 at the prompt
positions are discarded and replaced by ``P^i``:

    [CLS_i, _, E_i] = L_i([CLS_{i-1}, P^{i-1}, E_{i-1}])     i = 1 .. L

Output: the prompt tokens are dropped after the last block, so pooling sees exactly the sequence
open_clip would pool, [CLS, patches]. CLIP ViTs pool the [CLS] token (``pool_type='tok'``), which
then goes through ``ln_post`` and the projection to the joint embedding space. With ``n = 0`` the
module computes exactly ``visual(images)``.

Initialisation (VPT's Xavier-uniform-like rule): U(-b, b) with b = sqrt(6 / (3 p^2 + d)), p the
patch size and d the width, i.e. Xavier for a "fan-in" of one 3xpxp patch and a fan-out of d.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

from . import _compat  # noqa: F401  (must precede open_clip: makes torchvision importable)

# isort: split

import torch
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

VIT_BACKBONES = ("vit_b32", "vit_b16", "vit_l14", "demo_clip")


def prompt_init_bound(patch_size: Union[int, Sequence[int]], width: int) -> float:
    """VPT's init bound sqrt(6 / (3 * p^2 + d)); ``patch_size`` may be an int or (height, width)."""
    if isinstance(patch_size, int):
        patch_area = patch_size * patch_size
    else:
        patch_area = math.prod(patch_size)
    return math.sqrt(6.0 / float(3 * patch_area + width))


class VisualPrompts(nn.Module):
    """Learnable VPT prompt tokens for a frozen open_clip ``VisionTransformer``.

    ``forward(images)`` returns the image embedding (B, embed_dim) of the prompted encoder, i.e.
    ``visual(images)`` with the prompts in the token sequence (unnormalised, like open_clip).
    Only the prompts are parameters of this module: the visual encoder is held in a plain
    attribute, so ``parameters()``, ``state_dict()`` and ``.to()`` see only ``prompts``; move the
    encoder yourself (``to()`` here does not move it).
    """

    def __init__(self, visual: nn.Module, n_prompts: int = 16, deep: bool = False, seed: int = 0):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(
                f"visual prompts need a ViT image encoder (open_clip VisionTransformer), but the model's "
                f"image encoder is a {type(visual).__name__}. Valid backbones: {', '.join(VIT_BACKBONES)}."
            )
        if n_prompts < 0:
            raise ConfigError(f"n_prompts={n_prompts}: must be >= 0.")
        # a plain attribute, not a submodule: its weights are not ours to train or save
        object.__setattr__(self, "_visual", visual)
        self.n_prompts = int(n_prompts)
        self.deep = bool(deep)
        self.n_layers = len(visual.transformer.resblocks) if deep else 1
        width = visual.conv1.out_channels

        ref = visual.class_embedding
        # (L, n, width)
        self.prompts = nn.Parameter(
            torch.empty(self.n_layers, self.n_prompts, width, device=ref.device, dtype=ref.dtype)
        )
        self.initialize(seed)

    @torch.no_grad()
    def initialize(self, seed: int) -> None:
        """VPT's init U(-b, b), reproducible on any device: drawn on the CPU from a generator seeded
        by ``seed`` (a run passes its own seed, so seeds 1-3 start from different prompts)."""
        bound = prompt_init_bound(tuple(self.visual.patch_size), self.prompts.shape[-1])
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        init = torch.rand(tuple(self.prompts.shape), generator=generator) * (2 * bound) - bound
        self.prompts.copy_(init.to(self.prompts))

    @property
    def visual(self) -> VisionTransformer:
        return self._visual

    def extra_repr(self) -> str:
        return f"n_prompts={self.n_prompts}, deep={self.deep}, layers={self.n_layers}, width={self.prompts.shape[-1]}"

    # ----------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        n = self.n_prompts

        # --- embeddings: mirrors VisionTransformer._embeds (open_clip 3.3.0) ---
        x = v.conv1(images)  # (B, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, width, grid**2)
        x = x.permute(0, 2, 1)  # (B, grid**2, width)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)  # _expand_token
        x = torch.cat([cls, x], dim=1)  # (B, 1 + grid**2, width)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)  # identity unless training with patch_dropout > 0 (keeps [CLS])
        x = v.ln_pre(x)  # identity when no_ln_pre

        # --- VPT: [CLS, P^0_1..P^0_n, patches] before block 0 ---
        if n:
            x = torch.cat([x[:, :1], self._layer_prompts(0, x), x[:, 1:]], dim=1)

        # --- blocks one by one: mirrors Transformer.forward, plus deep prompt replacement ---
        transformer = v.transformer
        batch_first = transformer.batch_first
        if not batch_first:
            x = x.transpose(0, 1).contiguous()  # NLD -> LND
        for i, block in enumerate(transformer.resblocks):
            if self.deep and n and i > 0:
                x = self._replace_prompts(x, i, batch_first)
            # vision towers run without an attention mask (attn_mask=None, as open_clip calls them)
            if transformer.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)  # LND -> NLD

        # --- drop the prompt outputs: pooling sees [CLS, patches], as in open_clip ---
        if n:
            x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)

        # --- pooling + projection: mirrors VisionTransformer._pool and forward ---
        pooled = self._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled  # (B, embed_dim); open_clip's optional patch-token output is not returned

    # ----------------------------------------------------------------- helpers
    def _layer_prompts(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """Prompts of one layer expanded over the batch: (B, n, width), in the activations' dtype."""
        batch = like.shape[0]
        return self.prompts[layer].unsqueeze(0).expand(batch, -1, -1).to(like.dtype)

    def _replace_prompts(self, x: torch.Tensor, layer: int, batch_first: bool) -> torch.Tensor:
        """Swap positions 1..n (the previous layer's prompt outputs) for this layer's prompts."""
        n = self.n_prompts
        if batch_first:  # (B, L, D)
            return torch.cat([x[:, :1], self._layer_prompts(layer, x), x[:, 1 + n:]], dim=1)
        # (L, B, D): the sequence is dimension 0
        prompts = self._layer_prompts(layer, x.transpose(0, 1)).transpose(0, 1)
        return torch.cat([x[:1], prompts, x[1 + n:]], dim=0)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """VisionTransformer._pool (open_clip 3.3.0), pooled output only; x is [CLS, patches]."""
        v = self.visual
        if v.attn_pool is not None:  # CoCa-style towers; CLIP configs have none
            if v.attn_pool_contrastive is not None:
                x = v.ln_post(x)
                tokens = v.attn_pool(x)
                if v.attn_pool_type == "parallel":
                    return v.attn_pool_contrastive(x)
                assert v.attn_pool_type == "cascade"
                return v.attn_pool_contrastive(tokens)
            x = v.attn_pool(x)
            x = v.ln_post(x)
            return self._global_pool(x)
        if v.final_ln_after_pool:
            return v.ln_post(self._global_pool(x))
        return self._global_pool(v.ln_post(x))

    def _global_pool(self, x: torch.Tensor) -> torch.Tensor:
        """VisionTransformer._global_pool: CLIP uses 'tok', the [CLS] token at index 0."""
        pool_type = self.visual.pool_type
        if pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if pool_type == "tok":
            return x[:, 0]
        return x  # 'none'
