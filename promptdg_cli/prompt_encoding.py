"""Prompts that share their first positions, run through CLIP's causal text transformer once per group.

Under the causal mask the hidden state of position ``i`` depends on positions ``<= i`` only. When the
C prompts of a group begin with the same P token embeddings (DAPL: ``[SOS][ctx x16][dom_d x16]`` for
every class of domain d; PromptStyler: ``[SOS] a S style of a``; a zero-shot template's words before
the class name), those P positions have the same hidden states in every prompt of the group at every
layer. ``encode_shared_prefix`` runs them once per group and runs each prompt's own suffix against the
prefix's cached per-layer keys and values (plus its own causally masked suffix): the same features as
the plain truncated path, at the cost of ``G·P + G·C·S`` token positions instead of ``G·C·(P + S)``.

S is the longest suffix; a prompt with a shorter one still runs through S positions. ``encode_bucketed``
splits the prompts into buckets of similar suffix length (``length_buckets``: the split that minimises
the positions run, each bucket paying its own prefix pass) and runs each bucket on its own length:
PromptStyler's 345 DomainNet class names range from 1 to 7 tokens, most of them 1 or 2.

``PromptGroups`` holds the prompts (learned vectors may sit in the prefix or the suffix; gradients flow
through both); ``PromptGroups.full()`` gives the plain form that ``ClipBackbone.encode_prompts`` takes.
Only open_clip's default text blocks (``ResidualAttentionBlock`` over ``nn.MultiheadAttention``) are
understood; ``supports_shared_prefix`` says whether a model qualifies, and the backbone falls back to
the plain path where it does not.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


class EotFacts:
    """What the encoders need to know on the host about an EOT tensor (G, C): its smallest and largest
    position, each prompt's largest over the groups, and per prefix shape the suffix-length buckets with
    their index tensors on the device. Reading a GPU tensor's values waits for the GPU, so they are read
    once per prompt set (:func:`eot_facts`), not at every forward."""

    def __init__(self, rows: list):
        self.rows = rows  # (G, C) as lists
        self.lo, self.hi = min(min(r) for r in rows), max(max(r) for r in rows)
        self.col_max = [max(col) for col in zip(*rows)]  # (C,)
        self._plans: dict = {}

    def plan(self, prefix_len: int, prefix_cost: int, groups: int, device) -> Optional[list]:
        """``encode_bucketed``'s buckets: [(index tensor, suffix length, the bucket's facts)] and the
        order that puts the prompts back, or None for one bucket; built once per prefix shape and device."""
        key = (prefix_len, prefix_cost, groups, str(device))
        if key not in self._plans:
            lengths = [m - prefix_len + 1 for m in self.col_max]  # (C,)
            buckets = length_buckets(lengths, prefix_cost, groups)
            self._plans[key] = (
                None
                if len(buckets) == 1
                else (
                    [
                        (
                            torch.tensor(idx, device=device),
                            max(lengths[k] for k in idx),
                            EotFacts([[r[k] for k in idx] for r in self.rows]),
                        )
                        for idx in buckets
                    ],
                    torch.argsort(torch.tensor([k for idx in buckets for k in idx], device=device)),
                )
            )
        return self._plans[key]


_FACTS: dict = {}  # id(eot tensor) -> (weak reference, its version, EotFacts)


def eot_facts(eot: torch.Tensor) -> EotFacts:
    """The :class:`EotFacts` of ``eot`` ((C,) or (G, C)), read from the device once per tensor: a prompt
    learner passes the same EOT tensor at every forward (an in-place change, a new version, reads again)."""
    key = id(eot)
    hit = _FACTS.get(key)
    if hit is not None and hit[0]() is eot and hit[1] == eot._version:
        return hit[2]
    facts = EotFacts((eot if eot.dim() == 2 else eot.view(1, -1)).tolist())

    def forget(ref, key=key):
        if _FACTS.get(key, (None,))[0] is ref:
            del _FACTS[key]

    _FACTS[key] = (weakref.ref(eot, forget), eot._version, facts)
    return facts


@dataclass
class PromptGroups:
    """G groups of C prompts; prompt (g, c) is ``prefix[g] ++ suffix[g, c]``, its feature read at ``eot[g, c]``.

    prefix: (G, P, W) token embeddings shared by the C prompts of each group, or (1, P, W) shared by all.
    suffix: (G, C, S, W) each prompt's own positions, or (1, C, S, W) the same suffixes in every group.
        Suffixes of different lengths are padded at the end with anything (e.g. the tokenizer's
        padding): under the causal mask nothing after a prompt's EOT changes its feature.
    eot: (C,), (1, C) or (G, C) index of each prompt's end-of-text token in the full prompt
        (``P + its index in the suffix``); P <= eot < P + S.

    Intended use by a prompt learner (DAPL-shaped, ``dom``: (G, M2, W)):
        ``PromptGroups.from_parts([sos, ctx, dom], [class_tokens], eot)`` -> ``backbone.encode_grouped(p)``: (G, C, D)
    """

    prefix: torch.Tensor
    suffix: torch.Tensor
    eot: torch.Tensor
    facts: Optional[EotFacts] = field(default=None, repr=False, compare=False)  # (eot_facts(eot) when not given)

    def __post_init__(self):
        if self.prefix.dim() != 3:
            raise ValueError(f"PromptGroups.prefix must be (G, P, W), got shape {tuple(self.prefix.shape)}")
        if self.suffix.dim() != 4:
            raise ValueError(f"PromptGroups.suffix must be (G, C, S, W), got shape {tuple(self.suffix.shape)}")
        gp, gs = self.prefix.shape[0], self.suffix.shape[0]
        if self.prefix.shape[2] != self.suffix.shape[3] or (gp != gs and 1 not in (gp, gs)):
            raise ValueError(
                f"PromptGroups: prefix {tuple(self.prefix.shape)} and suffix {tuple(self.suffix.shape)} do not "
                f"match: the widths must agree and the group counts be equal or 1"
            )
        eot = self.eot if self.eot.dim() == 2 else self.eot.view(1, -1)
        if eot.shape[1] != self.suffix.shape[1] or (eot.shape[0] not in (1, self.groups)):
            raise ValueError(
                f"PromptGroups.eot has shape {tuple(self.eot.shape)}; valid: ({self.n_prompts},), "
                f"(1, {self.n_prompts}) or ({self.groups}, {self.n_prompts})"
            )
        p, s = self.prefix_len, self.suffix.shape[2]
        self.facts = self.facts or eot_facts(self.eot)
        lo, hi = self.facts.lo, self.facts.hi
        if lo < p or hi >= p + s:
            raise ValueError(
                f"PromptGroups.eot ranges over [{lo}, {hi}]; every end-of-text token must lie in the suffix, "
                f"at positions [{p}, {p + s - 1}] (prefix length {p}, suffix length {s})"
            )
        self.eot = eot.to(self.prefix.device)

    # ------------------------------------------------------------- construction
    @classmethod
    def from_parts(
        cls, prefix: Sequence[torch.Tensor], suffix: Sequence[torch.Tensor], eot: torch.Tensor
    ) -> "PromptGroups":
        """Concatenate along positions; each prefix part is (n, W) or (G, n, W), each suffix part is
        (C, n, W) or (G, C, n, W) (lower ranks and size-1 leading dims broadcast), e.g. [SOS], a shared
        context (M, W) and a per-group context (G, M2, W); class-specific context goes in the suffix."""
        return cls(_cat_positions(prefix, 1), _cat_positions(suffix, 2), eot)

    @classmethod
    def from_tokens(cls, embeddings: torch.Tensor, tokens: torch.Tensor, eot: torch.Tensor) -> "PromptGroups":
        """One group from token embeddings (B, L, W) of B frozen prompts, their tokens (B, L) and EOT
        positions (B,): the prefix is the longest run of leading tokens common to all prompts (at most
        up to the first EOT, so each prompt keeps its EOT in the suffix)."""
        same = (tokens == tokens[:1]).all(dim=0)  # (L,)
        differ = (~same).nonzero()
        p = int(differ[0]) if len(differ) else tokens.shape[1]
        p = min(p, int(eot.min()))
        length = int(eot.max()) + 1
        return cls(embeddings[:1, :p], embeddings[None, :, p:length], eot)

    # ------------------------------------------------------------- shapes
    @property
    def groups(self) -> int:
        return max(self.prefix.shape[0], self.suffix.shape[0])

    @property
    def n_prompts(self) -> int:
        return self.suffix.shape[1]

    @property
    def prefix_len(self) -> int:
        return self.prefix.shape[1]

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain form: token embeddings (G·C, P + S, W) group-major, and EOT positions (G·C,)."""
        g, c, s, w = self.groups, self.n_prompts, self.suffix.shape[2], self.suffix.shape[3]
        pre = self.prefix.unsqueeze(1).expand(g, c, self.prefix_len, w)
        emb = torch.cat([pre, self.suffix.expand(g, c, s, w)], dim=2)
        return emb.reshape(g * c, -1, w), self.eot.expand(g, c).reshape(-1)


def _cat_positions(parts: Sequence[torch.Tensor], lead: int) -> torch.Tensor:
    """Broadcast the leading dims of (..., n_i, W) tensors to ``lead + 1`` dims and concatenate on n."""
    if not parts:
        raise ValueError("PromptGroups.from_parts: give at least one prefix part and one suffix part")
    full = [p.reshape((1,) * (lead + 2 - p.dim()) + tuple(p.shape)) if p.dim() < lead + 2 else p for p in parts]
    if any(p.dim() != lead + 2 for p in full):
        raise ValueError(f"PromptGroups.from_parts: parts of shapes {[tuple(p.shape) for p in parts]} have more than "
                         f"{lead + 2} dims")
    shape = torch.broadcast_shapes(*[p.shape[:-2] for p in full])
    return torch.cat([p.expand(*shape, *p.shape[-2:]) for p in full], dim=-2)


# --------------------------------------------------------------------- the text transformer
def supports_shared_prefix(model: nn.Module) -> bool:
    """Whether ``model``'s text transformer is one ``encode_shared_prefix`` reproduces exactly: open_clip's
    default blocks (pre-norm, ``nn.MultiheadAttention`` with packed q/k/v, no extra key/value biases, no
    cross-attention norm) under the causal mask."""
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    mask = getattr(model, "attn_mask", None)
    if blocks is None or mask is None or len(blocks) == 0:
        return False
    for b in blocks:
        a = getattr(b, "attn", None)
        if type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv") or not isinstance(a, nn.MultiheadAttention):
            return False
        if not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn or (a.training and a.dropout > 0):
            return False
    causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), causal) and (mask[~causal] == 0).all())


def encode_shared_prefix(model: Any, prompts: PromptGroups) -> torch.Tensor:
    """(G, C, D) unnormalised text features; ``model`` (open_clip's CLIP) must pass ``supports_shared_prefix``."""
    assert prompts.facts is not None  # (set by PromptGroups)
    gp, p, w = prompts.prefix.shape
    g, c, s = prompts.groups, prompts.n_prompts, prompts.facts.hi + 1 - prompts.prefix_len
    if p + s > model.positional_embedding.shape[0]:
        raise ValueError(
            f"prompts of {p + s} positions exceed the text context length {model.positional_embedding.shape[0]}"
        )
    pos = model.positional_embedding.to(prompts.prefix.dtype)
    xp = prompts.prefix + pos[:p]  # (Gp, P, W)
    xs = (prompts.suffix[:, :, :s] + pos[p : p + s]).expand(g, c, s, w)  # (G, C, S, W)
    x = torch.cat([xp.reshape(-1, w), xs.reshape(-1, w)])  # (Gp·P + G·C·S, W): per-token ops run once on all
    # suffix queries see the whole prefix and their own suffix up to themselves
    allowed = torch.ones(s, p + s, dtype=torch.bool, device=x.device)
    allowed[:, p:] = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    for block in model.transformer.resblocks:
        x = x + block.ls_1(_attention(block, block.ln_1(x), (gp, p), (g, c, s), allowed))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    eot = (prompts.eot - p).expand(g, c)  # index in the suffix
    xs = x[gp * p :].view(g, c, s, w)
    rows = xs[torch.arange(g, device=x.device)[:, None], torch.arange(c, device=x.device)[None, :], eot]  # (G, C, W)
    rows = model.ln_final(rows)
    proj = model.text_projection
    return proj(rows) if isinstance(proj, nn.Linear) else rows @ proj  # (G, C, D)


def _attention(block, h: torch.Tensor, prefix_shape, suffix_shape, allowed: torch.Tensor) -> torch.Tensor:
    """``block.attn`` on the flat tokens ``h`` (Gp·P + G·C·S, W): causal within the prefix; each suffix
    attends to its group's prefix keys/values and, causally, to itself."""
    a: nn.MultiheadAttention = block.attn
    (gp, p), (g, c, s) = prefix_shape, suffix_shape
    heads, w = a.num_heads, h.shape[1]
    dh = w // heads
    q, k, v = F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
    n = gp * p

    def split_prefix(t):  # (Gp·P, W) -> (Gp, H, P, dh)
        return t[:n].view(gp, p, heads, dh).transpose(1, 2)

    def split_suffix(t):  # (G·C·S, W) -> (G, C, H, S, dh)
        return t[n:].view(g, c, s, heads, dh).permute(0, 1, 3, 2, 4)

    qp, kp, vp = split_prefix(q), split_prefix(k), split_prefix(v)
    out_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # (Gp, H, P, dh)
    qs, ks, vs = split_suffix(q), split_suffix(k), split_suffix(v)
    kp_all = kp.unsqueeze(1).expand(g, c, heads, p, dh)  # the group's prefix keys for each of its prompts
    vp_all = vp.unsqueeze(1).expand(g, c, heads, p, dh)
    k_all = torch.cat([kp_all, ks], dim=3).flatten(0, 1)  # (G·C, H, P + S, dh)
    v_all = torch.cat([vp_all, vs], dim=3).flatten(0, 1)
    out_s = F.scaled_dot_product_attention(qs.flatten(0, 1), k_all, v_all, attn_mask=allowed)  # (G·C, H, S, dh)
    out = torch.cat(
        [out_p.transpose(1, 2).reshape(n, w), out_s.view(g, c, heads, s, dh).permute(0, 1, 3, 2, 4).reshape(-1, w)]
    )
    return F.linear(out, a.out_proj.weight, a.out_proj.bias)


def length_buckets(lengths: Sequence[int], prefix_cost: int, groups: int) -> list[list[int]]:
    """Prompt indices split into buckets of contiguous suffix lengths, minimising the token positions
    run: a bucket of n prompts whose longest suffix is S costs ``prefix_cost + groups·n·S`` (its own
    prefix pass, ``prefix_cost`` = Gp·P, and its suffixes padded to S). Exact (dynamic programming over
    the distinct lengths, sorted); one bucket where splitting saves nothing."""
    distinct = sorted(set(int(n) for n in lengths))
    count = [sum(1 for n in lengths if n == d) for d in distinct]
    best = [0.0] + [float("inf")] * len(distinct)  # best[j]: cost of the shortest j distinct lengths
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        for i in range(j):  # the last bucket holds distinct[i:j]; its suffixes padded to distinct[j-1]
            cost = best[i] + prefix_cost + groups * sum(count[i:j]) * distinct[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append((distinct[cut[j]], distinct[j - 1]))
        j = cut[j]
    return [[k for k, n in enumerate(lengths) if lo <= n <= hi] for lo, hi in reversed(bounds)]


def encode_bucketed(model: Any, prompts: PromptGroups) -> torch.Tensor:
    """``encode_shared_prefix`` per bucket of suffix lengths (``length_buckets``): the same (G, C, D)
    features, without running short suffixes through the longest one's positions."""
    p = prompts.prefix_len
    assert prompts.facts is not None  # (set by PromptGroups)
    # (once per prompt set)
    plan = prompts.facts.plan(p, prompts.prefix.shape[0] * p, prompts.groups, prompts.suffix.device)
    if plan is None:
        return encode_shared_prefix(model, prompts)
    buckets, inverse = plan
    eot = prompts.eot
    parts = [encode_shared_prefix(model, PromptGroups(prompts.prefix, prompts.suffix[:, at, :s], eot[:, at], facts))
             for at, s, facts in buckets]
    return torch.cat(parts, dim=1)[:, inverse]  # back to the prompts' order
