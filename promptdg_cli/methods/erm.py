"""ERM as DomainBed trains it (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021, https://arxiv.org/abs/2007.01434; facebookresearch/DomainBed at 7ab1d01): a featurizer
and a linear classifier trained with cross-entropy on minibatches of every source domain.

One step (``algorithms.ERM.update``): the source domains' minibatches (``batch_size`` images each,
drawn uniformly with replacement, as DomainBed's ``InfiniteDataLoader`` with a ``RandomSampler(
replacement=True)`` draws them) are concatenated; the loss is the mean cross-entropy of
``classifier(dropout(featurizer(x)))``; Adam takes one step on every parameter of both
(``network.parameters()``; the BatchNorm statistics stay frozen, ``networks.ResNet``). Training
images go through DomainBed's ``augment_transform``, each draw with its own seeded crop and jitter.
Evaluations after step 0, every ``checkpoint_freq`` steps and after the last step
(``scripts/train.py``) are the selection candidates: the best mean of the source domains' held-out
accuracies (``model_selection.IIDAccuracySelectionMethod``; a tie keeps the earliest), or the last
checkpoint (``select`` last, or oracle: DomainBed's test-domain rule, whose held-out test accuracy
the runner records).

``hparams_seed`` k > 0: lr, weight_decay, batch_size and resnet_dropout are DomainBed's random draw
for (k, trial_seed) (``hparams_registry.py``, ``promptdg_cli/domainbed.py``); the values used are
logged in metrics.jsonl.
"""
from __future__ import annotations

from typing import ClassVar, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .. import devices
from ..data import EpochLoader, Features, image_batches
from ..domainbed import checkpoint_rounds, random_hparams
from ..evaluation import predict
from ..schema import ERMConfig
from ..training import Term
from .base import Method


class Draws(torch.utils.data.Dataset):
    """Draws ``(image index, seed, distilled?)`` -> (index, classifier input or None, LDM pixels or None):
    the classifier input through ``transform`` seeded by the draw's seed (None: not read, the
    features are cached); the LDM's [0, 1] pixels at ``ldm`` px for a distilled draw."""

    def __init__(self, paths: Sequence[str], transform, ldm: Optional[int] = None):
        from torchvision import transforms as T

        self.paths, self.transform = list(paths), transform
        self.ldm = ldm and T.Compose(
            [T.Resize(ldm, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(ldm), T.ToTensor()]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, draw):
        i, seed, distilled = (*draw, False)[:3]
        if self.transform is None and not distilled:
            return i, None, None
        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB")
            x = None
            if self.transform is not None:
                with torch.random.fork_rng(devices=[]):  # (the caller's random state is left alone)
                    torch.manual_seed(int(seed))
                    x = self.transform(im)
            return i, x, self.ldm(im) if distilled else None


def collate(items):
    """(indices (B,), classifier inputs (B, 3, S, S) or None, LDM pixels of the distilled draws or None)."""
    xs, ldm = [x for _, x, _ in items if x is not None], [p for _, _, p in items if p is not None]
    return torch.tensor([i for i, _, _ in items]), torch.stack(xs) if xs else None, torch.stack(ldm) if ldm else None


class ERM(Method):
    # (typed as Method's: DomainFusion overrides them)
    Config: ClassVar[Type] = ERMConfig
    backbone_kinds: ClassVar[tuple] = ("classifier",)
    loss_terms: ClassVar[Tuple[str, ...]] = ("ce",)
    feats: Optional[torch.Tensor]  # DomainFusion with a frozen encoder: the cached features of its draws

    def __init__(self, cfg, backbone, classnames, device, env=None):
        super().__init__(cfg, backbone, classnames, device, env)
        drawn = random_hparams(int(cfg.hparams_seed), self.env.trial_seed, self.env.dataset)
        self.hp = {k: drawn.get(k, cfg[k]) for k in ("lr", "weight_decay", "batch_size", "resnet_dropout")}
        self.frozen = False  # (DomainFusion's CLIP variant may keep its encoder frozen: cached features)
        self.featurizer, self.classifier = self.build_network()
        self.dropout = nn.Dropout(float(self.hp["resnet_dropout"]))
        # the training images' loader: workers started once, kept while the images stay
        self.pool = EpochLoader(device, collate)

    def build_network(self):
        """DomainBed's featurizer (the backbone's ResNet, BatchNorm frozen) and ``networks.Classifier``:
        nn.Linear(n_outputs, classes), PyTorch's initialisation."""
        feat = self.backbone.featurizer().to(self.device)
        return feat, nn.Linear(feat.n_outputs, len(self.classnames)).to(self.device)

    # ----------------------------------------------------------------- the network
    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(f)  # (B, n_outputs) -> (B, C)

    @torch.no_grad()
    def logits(self, x):
        return self.head(x.to(self.device))

    def train_transform(self):
        return self.backbone.train_transform() if self.cfg.augment else self.backbone.preprocess

    def features_for(self, feats: Features, batch_size: int = 64) -> Features:
        """The featurizer's outputs of the images (its current weights; DomainBed's plain transform)."""
        if self.frozen:
            return feats
        self.featurizer.eval()
        out = []
        with torch.no_grad(), devices.autocast(self.device, self.env.precision):
            for _, x, bad in image_batches(
                feats.paths, self.backbone.preprocess, batch_size, self.env.num_workers, device=self.device
            ):
                if bad:
                    raise OSError(f"cannot read {feats.paths[bad[0]]}")
                out.append(self.featurizer(x.to(self.device, non_blocking=True)).float().cpu())
        self.featurizer.train()
        return Features(torch.cat(out), feats.y, feats.domain, feats.paths)

    def state_dict(self):
        parts = {"classifier": self.classifier} | ({} if self.frozen else {"featurizer": self.featurizer})
        return {f"{name}.{k}": v.detach() for name, part in parts.items() for k, v in part.state_dict().items()}

    def load_state_dict(self, state):
        for name, part in (("classifier", self.classifier), ("featurizer", self.featurizer)):
            sub = {k[len(name) + 1:]: v.to(self.device) for k, v in state.items() if k.startswith(name + ".")}
            if sub:
                part.load_state_dict(sub)

    # ----------------------------------------------------------------- the loop's hooks
    def fit(self, data, ctx):
        self.setup(data, ctx)
        ctx.train(self)

    def setup(self, data, ctx) -> None:
        """The split's images by source domain, the schedule, and a metrics line with the hyper-parameters used."""
        self.train, self.val = data.train, data.val
        self.paths, self.labels = list(self.train.paths), self.train.y.to(self.device)
        domains = np.asarray(self.train.domain)
        # per source domain
        self.rows = [torch.as_tensor(np.flatnonzero(domains == d)) for d in dict.fromkeys(self.train.domain)]
        self.periods = checkpoint_rounds(int(self.cfg.steps), int(self.cfg.checkpoint_freq))
        ctx.log(hparams=self.hp, steps=int(self.cfg.steps), evaluations=len(self.periods), domains=len(self.rows))

    def rounds(self) -> int:
        return len(checkpoint_rounds(int(self.cfg.steps), int(self.cfg.checkpoint_freq)))

    def parameters_to_train(self) -> List[nn.Parameter]:
        return list(self.classifier.parameters()) + ([] if self.frozen else list(self.featurizer.parameters()))

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=float(self.hp["lr"]), weight_decay=float(self.hp["weight_decay"]))

    def draw(self, g: torch.Generator) -> torch.Tensor:
        """One step's images: ``batch_size`` drawn with replacement from each source domain, concatenated."""
        b = int(self.hp["batch_size"])
        return torch.cat([rows[torch.randint(len(rows), (b,), generator=g)] for rows in self.rows])

    def epoch_batches(self, epoch, g):
        """The steps of evaluation period ``epoch``: (image indices, a seed per draw for its augmentation)."""
        out = []
        for _ in range(self.periods[epoch]):
            idx = self.draw(g)
            out.append((idx, torch.randint(2**62, idx.shape, generator=g)))
        return out

    def ldm_size(self) -> Optional[int]:
        return None

    def load(self, epoch, batches):
        """Each step's (its draws, (indices, augmented images, LDM pixels)), loaded ahead by the run's workers."""
        steps = [list(zip(*(t.tolist() for t in b))) for b in batches]
        transform = None if self.frozen else self.train_transform()
        loader = self.pool.epoch(
            (tuple(self.paths), self.frozen),
            lambda: Draws(self.paths, transform, self.ldm_size()),
            steps,
            self.env.num_workers,
        )  # (its workers kept across epochs while the images stay)
        return zip(batches, loader)

    def forward(self, x: Optional[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """Training logits of a step's draws: featurizer, dropout, classifier (cached features when frozen)."""
        if self.frozen:
            assert self.feats is not None  # (load() encodes them first)
            f = self.feats[idx].to(self.device)
        else:
            assert x is not None  # (images are loaded unless their features are cached)
            f = self.featurizer(x.to(self.device, non_blocking=True))
        return self.head(self.dropout(f))

    def batch_loss(self, item, info):
        _, (idx, x, _) = item
        return [Term("ce", F.cross_entropy(self.forward(x, idx), self.labels[idx.to(self.device)]), len(idx))]

    def validate(self):
        """The mean over source domains of the held-out accuracy (DomainBed's training-domain validation)."""
        if self.val is None or not len(self.val):
            return None
        correct = (predict(self, self.val) == self.val.y).numpy()
        domains = np.asarray(self.val.domain)
        return float(100 * np.mean([correct[domains == d].mean() for d in dict.fromkeys(self.val.domain)]))
