"""ImageNet classifiers as backbones (``backbone.kind: classifier``): DomainBed's featurizer.

:class:`ClassifierBackbone` wraps a torchvision ResNet without its final layer. DomainBed's is
``resnet50`` with the ``IMAGENET1K_V1`` weights (``torchvision.models.resnet50(pretrained=True)`` in
DomainBed's ``networks.ResNet`` at 7ab1d01; later commits default to an AugMix ResNet-50 through timm).
The backbone itself stays frozen; a method that trains takes
:meth:`ClassifierBackbone.featurizer`, a trainable copy whose BatchNorm layers stay in eval mode
whatever the module's mode, as ``networks.ResNet.freeze_bn`` keeps them: running statistics fixed,
affine weights trained.

Preprocessing is DomainBed's (``datasets.py``): ``preprocess`` its plain transform (evaluation and
the feature cache), ``train_transform`` its ``augment_transform``, at ``backbone.image_size``.

Weights (``backbone.pretrained``): a torchvision weights name, read from where ``torch.hub`` keeps
it (``$TORCH_HOME/hub/checkpoints/``, default ``~/.cache/torch``) or ``backbone.cache_dir``; a local
file (a torchvision state dict, ``.pth`` or ``.safetensors``); or ``random``. A missing file is
downloaded only when the network answers and ``HF_HUB_OFFLINE`` is unset; otherwise it fails in
seconds naming the file and where to put it.
"""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Optional

from . import _compat  # noqa: F401  (before torchvision)

# isort: split

import torch
import torch.nn.functional as F
from torch import nn

from .devices import numerics_identity
from .domainbed import IMAGENET_MEAN, IMAGENET_STD
from .errors import ConfigError, WeightsNotFound

RANDOM = ("random", "none", "")


def plain_transform(size: int):
    """DomainBed's evaluation transform: Resize((size, size)), ToTensor, ImageNet Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def augment_transform(size: int, normalize=None):
    """DomainBed's ``augment_transform``: RandomResizedCrop(size, scale=(0.7, 1.0)), flip,
    ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale, ToTensor and ``normalize`` (ImageNet's)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            T.ToTensor(),
            normalize or T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class Featurizer(nn.Module):
    """A trainable ResNet without its final layer, BatchNorm frozen: ``train()`` leaves every
    BatchNorm layer in eval mode (DomainBed's ``networks.ResNet.train`` / ``freeze_bn``)."""

    def __init__(self, network: nn.Module, n_outputs: int):
        super().__init__()
        self.network, self.n_outputs = network, n_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)  # (B, 3, S, S) -> (B, n_outputs)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.network.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class ClassifierBackbone(nn.Module):
    """A frozen ImageNet ResNet without its final layer, with DomainBed's transforms."""

    kind = "classifier"

    def __init__(self, network: nn.Module, n_outputs: int, model_name: str, weights_id: str, image_size: int = 224,
                 precision: str = "fp32", arch: str = "resnet"):
        super().__init__()
        self.network, self.n_outputs, self.model_name, self.weights_id = network, n_outputs, model_name, weights_id
        self.image_size, self.precision, self.arch = int(image_size), str(precision), arch
        self.preprocess = plain_transform(self.image_size)
        self.network.eval()
        self.network.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, device: str | torch.device = "cpu") -> "ClassifierBackbone":
        # (fails before a build)
        path, weights_id = resolve_weights(str(cfg.model), str(cfg.pretrained), cfg.get("cache_dir"))
        network, n_outputs = build_network(str(cfg.model))
        if path is not None:
            load_weights(network, path)
        return cls(network.to(device), n_outputs, str(cfg.model), weights_id, int(cfg.get("image_size") or 224),
                   str(cfg.get("precision", "fp32")), str(cfg.get("arch", "resnet")))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.n_outputs

    def train_transform(self):
        return augment_transform(self.image_size)

    def identity(self) -> dict:
        return {
            "model": self.model_name,
            "weights": self.weights_id,
            "precision": self.precision,
            "image_size": self.image_size,
            **numerics_identity(self.device),
        }  # (GPU TF32 and CPU fp32 runs never share a cache file)

    @property
    def weights(self) -> dict:
        """The weights as loaded, as the record names them (``kind``: torchvision, file or random-init; ``id``)."""
        kind = self.weights_id.split(":", 1)[0] if ":" in self.weights_id else self.weights_id
        return {"kind": kind, "id": self.weights_id}

    def featurizer(self) -> Featurizer:
        """A trainable copy of the network (BatchNorm frozen), for a method that fine-tunes it."""
        f = Featurizer(copy.deepcopy(self.network).requires_grad_(True), self.n_outputs)
        return f.train()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """No feature, (B, 0): the methods on a classifier backbone fine-tune its featurizer and read
        the images themselves, so the feature cache only lists the readable images of each domain
        (no pass of the frozen network over the dataset)."""
        return images.new_zeros(images.shape[0], 0)

    @torch.no_grad()
    def features(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The frozen network's pooled features, (B, n_outputs)."""
        x = self.network(images)
        return F.normalize(x, dim=-1) if normalize else x


# --------------------------------------------------------------------- the network and its weights
def build_network(name: str):
    """A torchvision ResNet-family model with random weights and its ``fc`` replaced by the identity."""
    from torchvision import models

    valid = sorted(m for m in models.list_models(module=models) if m.startswith(("resnet", "resnext", "wide_resnet")))
    if name not in valid:
        raise ConfigError(
            f"backbone.model={name!r} is not a torchvision classifier promptdg can use. Valid: {', '.join(valid)}"
        )
    network = models.get_model(name, weights=None)
    n_outputs = network.fc.in_features
    network.fc = nn.Identity()
    return network, n_outputs


def _weights_enum(model: str, tag: str):
    from torchvision.models import get_model_weights

    enum = get_model_weights(model)
    if tag not in enum.__members__:
        raise ConfigError(f"backbone.pretrained={tag!r} is neither a weights name of torchvision's {model} nor a file. "
                          f"Valid: {', '.join(enum.__members__)}, random, or a path to a state-dict file.")
    return enum[tag]


def resolve_weights(model: str, pretrained: str, cache_dir: Optional[str]):
    """(local file or None, weights id) of ``backbone.pretrained``, or WeightsNotFound."""
    if pretrained.lower() in RANDOM:
        return None, "random-init"
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path or Path(pretrained).exists():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsNotFound(
                f"backbone.pretrained={pretrained!r}: no file there. Put a torchvision state dict of {model} "
                f"at that path, or use backbone.pretrained=IMAGENET1K_V1 (read from {hub_checkpoints()})."
            )
        st = path.stat()
        return path, f"file:{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    weights = _weights_enum(model, pretrained)
    name = os.path.basename(weights.url)
    folders = [hub_checkpoints()] + ([Path(os.path.expanduser(cache_dir))] if cache_dir else [])
    found = next((f / name for f in folders if (f / name).is_file()), None)
    if found is None:
        found = _download(weights, name, folders[0], model, pretrained)
    return found, f"torchvision:{model}.{pretrained} ({name})"


def hub_checkpoints() -> Path:
    """Where torch.hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _online(host: str = "download.pytorch.org", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download(weights, name: str, folder: Path, model: str, tag: str) -> Path:
    where = (
        f"{folder / name} (torch.hub's folder: $TORCH_HOME/hub/checkpoints), e.g. on a machine with network: "
        f"`curl -L --create-dirs -o {folder / name} {weights.url}`; or pass any local copy: "
        f"backbone.pretrained=/path/to/{name}"
    )
    if not _online():
        raise WeightsNotFound(
            f"The ImageNet weights {model} / {tag} are not on this machine and the network cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1). Put them at {where}. To run without them: backbone.pretrained=random."
        )
    try:
        weights.get_state_dict(progress=True, check_hash=True)  # torch.hub downloads into its folder, hash-checked
    except Exception as e:  # noqa: BLE001 - network errors, a bad hash, ...
        raise WeightsNotFound(f"Downloading {model} / {tag} failed ({e}). Put the file at {where}.") from e
    return folder / name


def load_weights(network: nn.Module, path: Path) -> None:
    """A torchvision state dict from ``path`` into ``network`` (its ``fc`` weights, if any, are dropped)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never executes code from the file
    if not isinstance(state, dict):
        raise WeightsNotFound(f"backbone.pretrained={str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsNotFound(f"backbone.pretrained={str(path)!r} is not a state dict of this network: "
                              f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}")
