"""Zero-shot CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, https://arxiv.org/abs/2103.00020).

Each class is represented by the text feature of a prompt built from its name; an image goes to the
class whose prompt feature has the highest cosine similarity. Templates: "a photo of a [class]."
(the CLIP default) and "[class]" alone (both rows of PromptStyler's tables); with several templates
the class feature is the normalised mean of the normalised template features (CLIP's prompt
ensembling). Nothing is trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F

from ..schema import MethodConfig
from .base import Method


@dataclass
class ZeroShotConfig(MethodConfig):
    name: str = "zeroshot"
    templates: List[str] = field(default_factory=lambda: ["a photo of a {}."])


class ZeroShot(Method):
    Config = ZeroShotConfig
    trains = False

    def __init__(self, cfg, backbone, classnames, device):
        super().__init__(cfg, backbone, classnames, device)
        self.weights = zeroshot_weights(backbone, classnames, list(cfg.templates))  # (C, D)

    @torch.no_grad()
    def logits(self, x):
        return x.to(self.weights) @ self.weights.T  # (B, D) @ (D, C)

    def state_dict(self):
        return {"weights": self.weights}

    def load_state_dict(self, state):
        self.weights = state["weights"].to(self.device)


@torch.no_grad()
def zeroshot_weights(backbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    per_template = []
    for t in templates:
        per_template.append(backbone.encode_text([t.format(c) for c in classnames], normalize=True))  # (C, D)
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)  # (C, D)
