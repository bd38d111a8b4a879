"""Accuracy of a method on a set of images (cached features, re-encoded first by a method whose
prompts change the image features)."""
from __future__ import annotations

import torch

from . import dist


@torch.no_grad()
def evaluate(method, feats, chunk: int = 8192, subset=None) -> dict:
    """Top-1 accuracy and mean per-class accuracy (%), on the method's ``features_for`` the images
    (the cached features, or a method's own encoding). ``subset``: class indices the test set covers (ImageNet-A/R:
    200 of 1000); the prediction is restricted to them. Under torchrun each rank predicts its
    contiguous part and every rank gets all the predictions."""
    y = feats.y
    correct = (predict(method, feats, chunk, subset) == y).float()
    per_class = [correct[y == c].mean().item() for c in torch.unique(y)]
    return {
        "top1": round(100 * correct.mean().item(), 4),
        "mean_per_class": round(100 * sum(per_class) / len(per_class), 4),
        "n": len(y),
    }


@torch.no_grad()
def predict(method, feats, chunk: int = 8192, subset=None) -> torch.Tensor:
    """The predicted class of every image of ``feats`` (N,), on every rank (see ``evaluate``)."""
    if dist.world() > 1:  # (DAPT re-encodes images: the ranks share that work)
        a, b = dist.shard_range(len(feats))
        feats = feats.subset(range(a, b))
    if len(feats):
        feats = method.features_for(feats)  # (the cached features, unless the method encodes images itself)
    keep = None if subset is None else torch.as_tensor(list(subset), dtype=torch.long)
    preds = [torch.empty(0, dtype=torch.long)]
    for i in range(0, len(feats), chunk):
        logits = method.logits(feats.x[i : i + chunk]).cpu()
        preds.append(logits.argmax(-1) if keep is None else keep[logits[:, keep].argmax(-1)])
    return dist.gather_cat(torch.cat(preds))


def accuracy(method, feats) -> float:
    """Top-1 accuracy (%) of ``method`` on ``feats`` (model selection on validation data)."""
    return evaluate(method, feats)["top1"]
