"""PromptStyler (Cho et al., "PromptStyler: Prompt-driven Style Generation for Source-free Domain
Generalization", ICCV 2023, https://arxiv.org/abs/2307.15199).

Source-free domain generalization: no image is seen in training, only the class names. The method
synthesises "domains" in CLIP's joint space through the text encoder T and trains a classifier on
text features, which is then applied to image features.

Stage 1, style word learning. K style word vectors S_1..S_K (pseudo-words, one token embedding
each) are learned one after another, each for L iterations, initialised N(0, 0.02²):

* style prompt             P_i^style          = "a S_i style of a"
* style-content prompt     P_i^style ∘ P_m^content = "a S_i style of a [class_m]"
* content prompt           P_n^content        = "[class_n]"

with features L2-normalised. The loss of style i is L_style + L_content:

* style diversity      L_style   = 1/(i-1) Σ_{j<i} |cos(T(P_i^style), T(P_j^style))|   (0 for i = 1;
  the earlier styles are frozen, their features computed once when they were learned)
* content consistency  z_imn     = cos(T(P_i^style ∘ P_m^content), T(P_n^content)),
                       L_content = -1/N Σ_m log softmax_n(z_imn)[m]   (no temperature)

Stage 2, classifier. The K × N style-content features (L2-normalised, label m) train a bias-free
linear layer W with the ArcFace loss (s = 5, m = 0.5) on **normalised** weights:
cos θ_j = <f, W_j/‖W_j‖>, target logit s·cos(θ_y + m), others s·cos θ_j.

Inference: the CLIP image encoder (its features come from the feature cache) and the classifier:
argmax_j cos θ_j. The text encoder is not used.

Speed (the math is unchanged): the K·L iterations dominate. Each iteration encodes the style prompt
and all N style-content prompts in one batch through the text transformer truncated at the last
end-of-text token (about 10-15 positions, not 77); the content features and the earlier styles'
features are computed once. Resume: a checkpoint after every learned style and every classifier
epoch. A preemption signal (SIGTERM/SIGUSR1/SIGUSR2) stops the run at the next of these checkpoints
(``ctx.save_checkpoint`` is a stopping point): a style is L text-encoder steps, seconds even on
large label sets, so no mid-style state is kept; the resumed run equals an uninterrupted one.

Choices the paper leaves open, with the defaults used here:
* the placeholder of S_i is the single token "x", whose embedding is replaced by S_i;
* each style has its own SGD optimiser (its momentum buffer starts at zero);
* style i's initialisation is drawn from a generator seeded by (run seed, i), so a resumed run
  equals an uninterrupted one;
* classifier weights start from Xavier-uniform; its SGD runs at a constant learning rate without
  weight decay (the paper names no schedule);
* ArcFace beyond θ > π − m (where cos(θ + m) stops decreasing) uses cos θ − m·sin m, the
  reference ArcFace implementation's continuation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..prompt_encoding import PromptGroups
from ..schema import PromptStylerConfig
from ..training import AmpStep, Term, shuffled_batches
from .base import Method

PLACEHOLDER = "x"  # one BPE token in CLIP's vocabulary; its embedding is replaced by S_i


# --------------------------------------------------------------------- the losses of the paper
def style_diversity_loss(style: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """L_style = 1/(i-1) Σ_{j<i} |cos(style, earlier_j)|; style (D,), earlier (i-1, D). Zero for i=1."""
    if earlier.shape[0] == 0:
        return style.sum() * 0.0 + 0.0  # keeps the graph (the first style has no diversity term); +0.0: never -0.0
    return (F.normalize(earlier, dim=-1) @ F.normalize(style, dim=-1)).abs().mean()


def content_consistency_loss(style_content: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """L_content = -1/N Σ_m log softmax_n(z_mn)[m], z_mn = cos(style_content_m, content_n); (N, D) each."""
    z = F.normalize(style_content, dim=-1) @ F.normalize(content, dim=-1).T  # (N, N)
    return F.cross_entropy(z, torch.arange(z.shape[0], device=z.device))


def arcface_logits(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, m: float
) -> torch.Tensor:
    """ArcFace logits: s·cos(θ_y + m) for the label, s·cos θ_j otherwise; θ_j = angle(f, W_j).

    Both the features (B, D) and the class weights (C, D) are L2-normalised here: with raw
    weights the "cosine" would be scaled by ‖W_j‖ and the margin would act on a different angle.
    """
    cos = F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T  # (B, C)
    sin = torch.sqrt((1.0 - cos.pow(2)).clamp_min(0.0))
    cos_margin = cos * math.cos(m) - sin * math.sin(m)  # cos(θ + m)
    cos_margin = torch.where(cos > math.cos(math.pi - m), cos_margin, cos - m * math.sin(m))
    target = F.one_hot(labels, cos.shape[1]).bool()
    return s * torch.where(target, cos_margin, cos)


def arcface_loss(features, weight, labels, s: float = 5.0, m: float = 0.5) -> torch.Tensor:
    return F.cross_entropy(arcface_logits(features, weight, labels, s, m), labels)


# --------------------------------------------------------------------- prompts with a style word
class StylePrompts(nn.Module):
    """"a S style of a" and the N "a S style of a [class]" prompts, one group sharing "[SOS] a S style of a".

    Prompt 0 is the style prompt, prompts 1..N the style-content prompts; ``forward(style)`` splices
    the style vector in at the placeholder's position of the shared prefix (embeddings are kept only
    up to the last end-of-text token).
    """

    before: torch.Tensor  # (buffers)
    after: torch.Tensor
    suffix: torch.Tensor

    def __init__(self, backbone, classnames: list[str], template: str):
        super().__init__()
        style_text = template.format(PLACEHOLDER)
        tokens = backbone.tokenize([style_text] + [f"{style_text} {c}" for c in classnames])  # (N+1, 77)
        marker = int(backbone.tokenize([PLACEHOLDER])[0, 1])
        where = (tokens == marker).int().argmax(dim=1)
        if not bool((tokens[:, int(where[0])] == marker).all()) or not bool((where == where[0]).all()):
            raise ValueError(f"style template {template!r} must put the style word at one fixed token position")
        self.position = int(where[0])
        self.eot = backbone.eot_positions(tokens)  # (N+1,)
        self.shared = int(self.eot.min())  # the style prompt's tokens before its EOT begin every prompt
        with torch.no_grad():
            emb = backbone.token_embedding(tokens[:, : int(self.eot.max()) + 1])  # (N+1, L, W)
        self.register_buffer("before", emb[0, : self.position].clone())  # [SOS] a
        self.register_buffer("after", emb[0, self.position + 1 : self.shared].clone())  # style of a
        self.register_buffer("suffix", emb[:, self.shared :].clone())  # [EOS] | class tokens [EOS], padding

    def forward(self, style: torch.Tensor) -> PromptGroups:
        return PromptGroups.from_parts(
            [self.before, style.view(1, -1).to(self.before.dtype), self.after], [self.suffix], self.eot
        )


# --------------------------------------------------------------------- the method
class PromptStyler(Method):
    Config = PromptStylerConfig
    protocol = "source_free"
    loss_terms = ("train_loss",)  # the classifier's ArcFace loss (stage 2)

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        self.prompts = StylePrompts(backbone, classnames, cfg.style_template).to(device)
        width, dim, n = backbone.text_width, backbone.embed_dim, len(classnames)
        self.styles = torch.zeros(cfg.n_styles, width, device=device)  # S_1..S_K
        self.classifier = nn.Linear(dim, n, bias=False).to(device)

    def encode(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(style feature (D,), style-content features (N, D)), normalised, in one text batch."""
        f = self.backbone.encode_grouped(self.prompts(style))[0]
        return f[0], f[1:]

    def init_style(self, i: int) -> torch.Tensor:
        g = self.env.rng("promptstyler-style", i)
        return (torch.randn(self.backbone.text_width, generator=g) * self.cfg.style_init_std).to(self.device)

    def style_step(self, s: torch.Tensor, earlier: torch.Tensor, opt, amp: AmpStep):
        """One iteration of stage 1: the text encoder under the run's precision (``amp``), the losses in
        fp32 on its features, one SGD step; returns (L_style, L_content)."""
        with amp.autocast():
            style_f, sc_f = self.encode(s)
        l_style = style_diversity_loss(style_f.float(), earlier)
        l_content = content_consistency_loss(sc_f.float(), self.content)
        opt.zero_grad(set_to_none=True)
        amp.backward(l_style + l_content)
        amp.step(opt)
        return l_style, l_content

    def learn_style(self, i: int, earlier: dict, ctx) -> dict:
        """Stage 1 for style i: L SGD steps on L_style + L_content, the earlier styles frozen."""
        cfg = self.cfg
        earlier_feats = (
            torch.stack([earlier[j]["feature"].to(self.device) for j in range(i)])
            if i
            else torch.zeros(0, self.backbone.embed_dim, device=self.device)
        )
        s = nn.Parameter(self.init_style(i))
        opt = torch.optim.SGD([s], lr=cfg.style_lr, momentum=cfg.style_momentum)  # a fresh optimiser per style
        amp = AmpStep(self.device, self.env.precision)  # (fp16: a fresh loss scale per style, as the optimiser)
        for _ in range(cfg.style_iters):
            l_style, l_content = self.style_step(s, earlier_feats, opt, amp)
        with torch.no_grad(), amp.autocast():
            style_f = self.encode(s.detach())[0].float()
        ctx.log(stage="style", style=i, l_style=l_style.item(), l_content=l_content.item(),
                **({"fp16_skipped_steps": amp.skipped} if amp.scaler is not None else {}))
        return {"vector": s.detach().cpu(), "feature": style_f.cpu()}

    def fit(self, data, ctx):
        """Source-free: no image is read (the protocol hands over none); only the class names."""
        amp = AmpStep(self.device, self.env.precision)
        with torch.no_grad(), amp.autocast():
            self.content = self.backbone.encode_text(self.classnames, normalize=True).float()  # T("[class_n]"), (N, D)
        styles = ctx.units(
            "styles",
            list(range(self.cfg.n_styles)),
            lambda i, done: self.learn_style(i, done, ctx),
            desc="promptstyler styles",
        )
        self.styles = torch.stack([styles[i]["vector"] for i in range(self.cfg.n_styles)]).to(self.device)
        with torch.no_grad(), amp.autocast():  # the K x N style-content features, label m (style-major)
            self.x = torch.cat([self.encode(v)[1].float() for v in self.styles])  # (K*N, D), normalised
        self.y = torch.arange(len(self.classnames), device=self.device).repeat(self.cfg.n_styles)
        w0 = torch.empty_like(self.classifier.weight, device="cpu")
        torch.nn.init.xavier_uniform_(w0, generator=torch.Generator().manual_seed(self.env.seed))
        self.classifier.weight.data.copy_(w0)
        ctx.train(self)  # stage 2: the ArcFace classifier

    # ----------------------------------------------------------------- the loop's hooks (stage 2)
    def parameters_to_train(self):
        return [self.classifier.weight]

    def optimizer(self, params):
        # constant: the paper names no schedule
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum)

    def epoch_batches(self, epoch, g):
        return shuffled_batches(len(self.y), self.cfg.batch_size, g)

    def batch_loss(self, idx, info):
        idx = idx.to(self.device)
        return [
            Term(
                "train_loss",
                arcface_loss(self.x[idx], self.classifier.weight, self.y[idx], self.cfg.arcface_s, self.cfg.arcface_m),
                len(idx),
            )
        ]

    # ----------------------------------------------------------------- inference and state
    @torch.no_grad()
    def logits(self, x):
        """Cosine between image features and the normalised class weights (no margin at test)."""
        return F.normalize(x.to(self.device), dim=-1) @ F.normalize(self.classifier.weight, dim=-1).T

    def state_dict(self):
        return {"styles": self.styles, "classifier": self.classifier.weight.detach()}

    def load_state_dict(self, state):
        self.styles = state["styles"].to(self.device)
        self.classifier.weight.data.copy_(state["classifier"].to(self.device))
