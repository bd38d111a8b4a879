"""Zero-shot CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, https://arxiv.org/abs/2103.00020).

Each class is represented by the text feature of a prompt built from its name; an image goes to the
class whose prompt feature has the highest cosine similarity. Templates: "a photo of a [class]."
(the CLIP default) and "[class]" alone (both rows of PromptStyler's tables); with several templates
the class feature is the normalised mean of the normalised template features (CLIP's prompt
ensembling). Nothing is trained.
"""
from __future__ import annotations

import torch

from ..schema import ZeroShotConfig
from .base import Method


class ZeroShot(Method):
    Config = ZeroShotConfig
    trains = False

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        self.weights = backbone.zeroshot_weights(classnames, list(cfg.templates))  # (C, D)

    @torch.no_grad()
    def logits(self, x):
        return x.to(self.weights) @ self.weights.T  # (B, D) @ (D, C)

    def state_dict(self):
        return {"weights": self.weights}

    def load_state_dict(self, state):
        self.weights = state["weights"].to(self.device)
