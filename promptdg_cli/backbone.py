"""A frozen CLIP backbone over open_clip, with the prompt-embedding path prompt learners need.

``ClipBackbone`` wraps any open_clip model of the CLIP architecture (a ViT or ModifiedResNet image
tower and the causal text transformer). Besides plain ``encode_text`` / ``encode_image`` it exposes
``encode_prompts``: learnable vectors are spliced into the token embeddings of a prompt (CoOp, DAPL,
DAPT and PromptStyler all do this) and the text transformer runs only up to the longest
end-of-text (EOT) position of the batch. With the causal mask, position ``i`` attends to positions
``<= i`` only, so everything after the last EOT can change nothing that is pooled: dropping it
gives the same features at a fraction of the cost (a prompt of 16 context tokens and a class name
fills ~20 of the 77 positions). ``encode_grouped`` goes further for prompts that share their leading
positions (a domain's context in DAPL, PromptStyler's "a S style of a", a template's first words):
the shared prefix runs once per group, each prompt's own suffix against its keys and values
(``prompt_encoding.py``), with the same features.

Weights: ``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...) or a local
checkpoint file; or ``model`` names them with open_clip's ``hf-hub:org/repo[@revision]`` or
``local-dir:/path`` (``weights.py``: named by repository and commit). Tags are looked up in the local
Hugging Face / open_clip caches first; a missing file fails in seconds with the place to put it,
never with a hanging download. ``ClipBackbone.weights`` describes what was loaded (the record's
``weights``); its ``id`` is part of every feature-cache key.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from . import _compat  # noqa: F401  (must precede open_clip: makes torchvision importable)

# isort: split

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .devices import numerics_identity
from .errors import ConfigError, WeightsNotFound
from .prompt_encoding import PromptGroups, encode_bucketed, supports_shared_prefix
from .weights import file_weights, has_schema, hub_revision, hub_unavailable, resolve_schema

log = logging.getLogger("promptdg")

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


class ClipBackbone(nn.Module):
    """Frozen CLIP: image encoder, text encoder, tokenizer and the preprocessing transform."""

    use_shared_prefix = True  # False: every grouped prompt through the plain truncated path (for checking)

    def __init__(self, model: nn.Module, tokenizer, preprocess, model_name: str, weights_id: str, arch: str,
                 precision: str = "fp32", weights: Optional[dict] = None):
        super().__init__()
        self.precision = str(precision)  # autocast of feature extraction and the prompt path on CUDA
        self.model: Any = model  # open_clip's CLIP: its towers and buffers are read by name (untyped)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_name = model_name
        self.weights_id = weights_id  # names the weights for cache keys (tag, file path+size+mtime, hub repo@commit)
        self.weights = weights or {"kind": "unknown", "id": weights_id}  # what was loaded, as the record says it
        self.arch = arch
        self._shared_prefix_ok: Optional[bool] = None  # whether encode_grouped can share prefixes (checked once)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg, device: str | torch.device = "cpu") -> "ClipBackbone":
        """Build from a ``BackboneConfig`` (a built-in checkpoint, the demo CLIP, is built by the runner
        before this is called: ``runner.prepare_backbone``)."""
        model_name, pretrained = cfg.model, str(cfg.pretrained)
        if has_schema(model_name):  # hf-hub:org/repo[@rev] or local-dir:/path: config and weights from there
            load_name, weights = resolve_schema(model_name, cfg.cache_dir)
            if pretrained.lower() not in ("", "none", "null", "random"):
                log.warning(
                    "backbone.pretrained=%s is ignored: backbone.model=%s names its weights (as open_clip does)",
                    pretrained,
                    model_name,
                )
            checkpoint, preprocess_cfg = None, None
        else:
            if open_clip.get_model_config(model_name) is None:
                clip_like = [m for m in open_clip.list_models() if m.startswith(("RN", "ViT-B", "ViT-L", "demo"))]
                raise ConfigError(
                    f"backbone.model={model_name!r} is not an open_clip model config. CLIP-architecture "
                    f"names include: {', '.join(clip_like)} (all: open_clip.list_models()); "
                    f"or hf-hub:org/repo, local-dir:/path."
                )
            checkpoint, preprocess_cfg, weights_id = resolve_weights(model_name, pretrained, cfg.cache_dir)
            load_name, weights = model_name, describe_weights(pretrained, checkpoint, weights_id)
        model, _, preprocess = open_clip.create_model_and_transforms(
            load_name,
            pretrained=checkpoint,
            device=device,
            image_mean=(preprocess_cfg or {}).get("mean"),
            image_std=(preprocess_cfg or {}).get("std"),
            image_interpolation=(preprocess_cfg or {}).get("interpolation"),
            image_resize_mode=(preprocess_cfg or {}).get("resize_mode"),
            weights_only=True,  # never execute code from a checkpoint
        )
        tokenizer = open_clip.get_tokenizer(load_name)
        return cls(
            model,
            tokenizer,
            preprocess,
            model_name,
            weights["id"],
            str(cfg.arch),
            str(getattr(cfg, "precision", "fp32")),
            weights,
        )

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.model.positional_embedding.shape[0]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def identity(self) -> dict:
        """Everything about the weights and the number format that changes a feature (part of every
        cache key: CPU (fp32) and bf16 GPU features of one model never share a cache file), the device kind
        and matmul precision included (``devices.numerics_identity``: TF32 GPU features are not CPU fp32 ones)."""
        return {
            "model": self.model_name,
            "weights": self.weights_id,
            "precision": self.precision,
            **numerics_identity(self.device),
        }

    # ----------------------------------------------------------------- text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)  # (B, 77)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)  # (B, 77) -> (B, 77, width)

    @staticmethod
    def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
        # CLIP's EOT id is the largest in its vocabulary, so argmax finds it (open_clip does the same)
        return tokens.argmax(dim=-1)  # (B,)

    def encode_prompts(
        self,
        embeddings: torch.Tensor,
        eot: torch.Tensor,
        normalize: bool = True,
        truncate: bool = True,
        longest: Optional[int] = None,
    ) -> torch.Tensor:
        """Text features of prompts given as token embeddings.

        embeddings: (B, L, width) with L <= 77, learned vectors already spliced in.
        eot: (B,) index of each prompt's end-of-text token; its output is the feature.
        truncate: run only positions [0, max(eot)] (same result under the causal mask).
        longest: max(eot) when the caller knows it (reading it from a GPU tensor waits for the GPU).
        """
        m = self.model
        length = (int(eot.max()) if longest is None else int(longest)) + 1 if truncate else embeddings.shape[1]
        x = embeddings[:, :length] + m.positional_embedding[:length].to(embeddings.dtype)  # (B, L', width)
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)  # open_clip's text transformer is batch-first: NLD
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, width)
        proj = m.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = True, truncate: bool = True):
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.encode_prompts(self.token_embedding(tokens), self.eot_positions(tokens), normalize, truncate)

    def encode_grouped(self, prompts: PromptGroups, normalize: bool = True) -> torch.Tensor:
        """(G, C, D) features of grouped prompts: each group's shared prefix runs through the text
        transformer once, each prompt's suffix against the prefix's keys/values (see prompt_encoding.py).
        Equal to ``encode_prompts(*prompts.full())``; a text tower of other blocks runs exactly that."""
        if self._shared_prefix_ok is None:
            self._shared_prefix_ok = supports_shared_prefix(self.model)
        if self._shared_prefix_ok and prompts.prefix_len > 0 and self.use_shared_prefix:
            x = encode_bucketed(self.model, prompts)
        else:
            emb, eot = prompts.full()
            assert prompts.facts is not None  # (set by PromptGroups)
            x = self.encode_prompts(emb, eot, normalize=False, longest=prompts.facts.hi).view(
                prompts.groups, prompts.n_prompts, -1
            )
        return F.normalize(x, dim=-1) if normalize else x

    def group_texts(self, texts: Sequence[str]) -> PromptGroups:
        """One group of frozen prompts; their longest common run of leading tokens is the shared prefix
        (a template's words before the class name)."""
        tokens = self.tokenize(texts)
        eot = self.eot_positions(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]
        with torch.no_grad():
            emb = self.token_embedding(tokens)
        return PromptGroups.from_tokens(emb, tokens, eot)

    def encode_text_grouped(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """``encode_text`` of frozen texts through the shared-prefix path: (B, D)."""
        return self.encode_grouped(self.group_texts(texts), normalize)[0]

    @torch.no_grad()
    def zeroshot_weights(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot CLIP's class weights (C, D): each template's normalised class features (the
        template's words before the class name run once), averaged over templates and renormalised
        (CLIP's prompt ensembling; one template: its features)."""
        per_template = [self.encode_text_grouped([t.format(c) for c in classnames]) for t in templates]  # (C, D) each
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)

    # ----------------------------------------------------------------- image side
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.model.encode_image(images)  # (B, 3, H, W) -> (B, D)
        return F.normalize(x, dim=-1) if normalize else x


# --------------------------------------------------------------------- weights
def resolve_weights(model_name: str, pretrained: str, cache_dir: Optional[str]):
    """Return (local checkpoint path, preprocess overrides, weights id) or raise WeightsNotFound."""
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if not pretrained or pretrained.lower() in ("none", "random"):
        return None, None, "random-init"
    if tag_cfg:
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        path = _cached_tag_file(tag_cfg, cache_dir)
        if path is None:
            path = _download_tag(model_name, pretrained, tag_cfg, cache_dir)
        return str(path), preprocess, f"{model_name}:{pretrained}"
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path or Path(pretrained).exists():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsNotFound(
                f"backbone.pretrained={pretrained!r}: no checkpoint file there. Put the open_clip/OpenAI "
                f"checkpoint of {model_name} at that path, or use one of the open_clip tags of this model: "
                f"backbone.pretrained=<{'|'.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'}>."
            )
        st = path.stat()
        return str(path), None, f"file:{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise WeightsNotFound(
        f"backbone.pretrained={pretrained!r} is neither an open_clip tag of {model_name} nor a checkpoint "
        f"file. Valid tags: {', '.join(tags) or '(none)'}; or give a path to a local checkpoint file."
    )


def describe_weights(pretrained: str, checkpoint: Optional[str], weights_id: str) -> dict:
    """The record's ``weights`` for a tag, a checkpoint file or random weights (``resolve_weights``' result)."""
    if checkpoint is None:
        return {"kind": "random-init", "id": weights_id}
    if weights_id.startswith("file:"):
        return {**file_weights("file", Path(checkpoint)), "id": weights_id}
    repo, commit = hub_revision(Path(checkpoint))  # a tag's file in the Hugging Face cache: its repository and commit
    return {
        "kind": "open_clip-tag",
        "id": weights_id,
        "tag": pretrained,
        "file": os.path.basename(checkpoint),
        "repo": repo,
        "revision": commit,
    }


def _hf_repo_and_files(tag_cfg: dict):
    # open_clip writes 'org/repo/' (default file names) or 'org/repo/file.bin'
    repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    if not repo:
        return None, []
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return repo, names


def _cached_tag_file(tag_cfg: dict, cache_dir: Optional[str]) -> Optional[Path]:
    """A tag's weights already on disk: the HF hub cache, or open_clip's URL cache (~/.cache/clip)."""
    from huggingface_hub import try_to_load_from_cache

    repo, names = _hf_repo_and_files(tag_cfg)
    for name in names:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    url = tag_cfg.get("url", "")
    if url:
        local = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return local
    return None


def _download_tag(model_name: str, tag: str, tag_cfg: dict, cache_dir: Optional[str]) -> Path:
    repo, names = _hf_repo_and_files(tag_cfg)
    where = (
        f"the Hugging Face cache ({cache_dir or os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}), "
        f"e.g. on a machine with network: `huggingface-cli download {repo} {names[0] if names else ''}`"
        if repo
        else f"{cache_dir or '~/.cache/clip'}/{os.path.basename(tag_cfg.get('url', ''))}"
    )
    why = hub_unavailable()
    if why:
        raise WeightsNotFound(
            f"Pretrained weights {model_name} / {tag!r} are not on this machine and {why}. Put them into "
            f"{where}; or download the checkpoint file anywhere and pass its path: "
            f"backbone.pretrained=/path/to/checkpoint. "
            f"To run without real weights, use the demo backbone: backbone=demo_clip."
        )
    try:
        return Path(open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir))
    except Exception as e:  # network errors, gated repos, ...
        raise WeightsNotFound(f"Downloading {model_name} / {tag!r} failed ({e}). Put the weights into {where}.") from e

