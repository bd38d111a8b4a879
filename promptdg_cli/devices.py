"""The run's device and number formats: which device, the autocast of ``backbone.precision``, the
torch thread count of a block, and peak memory."""
from __future__ import annotations

import resource
from contextlib import contextmanager

import torch

from . import dist
from .errors import ConfigError


def select_device(name: str) -> torch.device:
    """The run's device; under torchrun ``auto``/``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available. Valid here: auto, cpu")
    if name == "cuda" and dist.env_world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """The autocast context of ``backbone.precision`` on CUDA (bf16/fp16); nothing on the CPU or for fp32."""
    p = str(precision)
    if device.type != "cuda" or p == "fp32":
        return _Null()
    return torch.autocast("cuda", dtype=torch.bfloat16 if p == "bf16" else torch.float16)


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (or the decorated function), restored
    after. Training on the CPU sums in an order that depends on the thread count, so a model trained
    with 1 and with 2 threads differs in its last bits, and after a few hundred steps in its numbers."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def peak_memory_mb(device: torch.device) -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"cpu_rss": round(rss_kb / 1024, 1), "cuda": None if cuda is None else round(cuda, 1)}
