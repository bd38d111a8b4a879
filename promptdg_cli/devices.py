"""The run's device and number formats: which device (each torchrun rank its own GPU), the float32
matmul precision, the loader's worker count, the autocast of ``backbone.precision``, the torch thread
count of a block, and peak memory per run."""
from __future__ import annotations

import os
import resource
from contextlib import contextmanager

import torch

from . import dist
from .errors import ConfigError


def select_device(name: str) -> torch.device:
    """The run's device (:func:`device_for_rank` on this process: under torchrun each rank its own GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available. Valid here: auto, cpu")
    count = torch.cuda.device_count() if name.startswith("cuda") else 0
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return torch.device(device_for_rank(name, dist.local_rank(), dist.env_world_size(), count, ranks))


def device_for_rank(name: str, local_rank: int, world: int, cuda_count: int, local_world: int = 1) -> str:
    """The device of the rank ``local_rank`` of a job of ``world`` ranks (``local_world`` on this node),
    on a node with ``cuda_count`` visible GPUs. One process (``world`` 1): ``name`` as given. Under
    torchrun ``cuda`` is ``cuda:LOCAL_RANK``, and ``cuda:N`` names the job's first GPU on the node:
    rank r uses ``cuda:N+r`` (so ``cuda:2`` with 2 ranks a node uses GPUs 2 and 3); a GPU index past
    the node's GPUs is a ConfigError naming what would be valid."""
    if not name.startswith("cuda"):
        return name
    first = int(name.split(":")[1]) if ":" in name else 0
    index = first + (local_rank if world > 1 else 0)
    if index >= cuda_count:
        if world > 1:
            last = max(cuda_count - max(local_world, 1), 0)
            raise ConfigError(
                f"device={name!r} under torchrun: rank {local_rank} of this node would use cuda:{index} (cuda:N is the "
                f"job's first GPU, rank r uses cuda:N+r), but {cuda_count} GPU(s) are visible. Valid with "
                f"{local_world} rank(s) a node: device=cuda, or cuda:N with N <= {last}"
            )
        raise ConfigError(f"device={name!r}: {cuda_count} GPU(s) are visible. Valid: auto, cpu, cuda, "
                          + ", ".join(f"cuda:{i}" for i in range(cuda_count)))
    return f"cuda:{index}" if world > 1 or ":" in name else "cuda"


MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")
MAX_AUTO_WORKERS = 32  # num_workers=auto: past this, more JPEG decoders mostly add memory (each worker forks the run)


def set_matmul_precision(setting: str, device: torch.device) -> str:
    """Set float32 matmul and cuDNN convolution precision for the run, explicitly (``matmul_precision``);
    returns what was set. ``auto``: ``high`` on CUDA (TF32 tensor cores for the fp32 matmuls and
    convolutions that autocast leaves in fp32, PyTorch's recommendation for Ampere and later), ``highest``
    on the CPU (plain fp32, the precision the CPU tests check). ``highest`` turns cuDNN's TF32 off too
    (PyTorch leaves it on by default), so ``highest`` means fp32 everywhere."""
    if setting not in MATMUL_PRECISIONS:
        raise ConfigError(f"matmul_precision={setting!r} is not valid. Valid: {', '.join(MATMUL_PRECISIONS)}")
    value = ("high" if device.type == "cuda" else "highest") if setting == "auto" else setting
    torch.set_float32_matmul_precision(value)
    torch.backends.cudnn.allow_tf32 = value != "highest"
    return value


def numerics_identity(device: torch.device) -> dict:
    """What besides the weights and ``backbone.precision`` changes a feature's last bits: the device kind
    and the float32 matmul precision (TF32 on a GPU). Empty for the CPU at full fp32 precision, so the
    feature-cache keys of CPU runs stay those of promptdg versions before this was part of them."""
    matmul = torch.get_float32_matmul_precision()
    if device.type == "cpu" and matmul == "highest":
        return {}
    return {"device": device.type, "matmul_precision": matmul, "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32)}


def cpus_available(environ=None) -> tuple[int, str]:
    """The CPUs this process has (this rank's share of them under torchrun) and how that was found:
    the CPU affinity (``os.sched_getaffinity``: what a cgroup, taskset or Slurm's binding allows), at
    most Slurm's ``SLURM_CPUS_PER_TASK``, divided by the torchrun ranks of this node
    (``LOCAL_WORLD_SIZE``) unless each rank is a Slurm task of its own (``SLURM_NTASKS`` > 1)."""
    env = os.environ if environ is None else environ
    try:
        n, how = len(os.sched_getaffinity(0)), "sched_getaffinity"
    except AttributeError:  # (not Linux)
        n, how = os.cpu_count() or 1, "os.cpu_count"
    slurm = str(env.get("SLURM_CPUS_PER_TASK", ""))
    if slurm.isdigit() and 0 < int(slurm) < n:
        n, how = int(slurm), "SLURM_CPUS_PER_TASK"
    ranks = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    if ranks > 1 and int(env.get("SLURM_NTASKS", "1") or 1) <= 1:
        n, how = max(1, n // ranks), f"{how} / {ranks} torchrun ranks"
    return n, how


def loader_workers(setting, environ=None) -> tuple[int, str]:
    """``num_workers``: a number as given, or ``auto``: one worker per CPU this process has but one (the
    main process feeds the device), at most :data:`MAX_AUTO_WORKERS`. Returns (workers, how chosen)."""
    if str(setting) != "auto":
        return int(setting), "num_workers"
    n, how = cpus_available(environ)
    return min(
        max(n - 1, 0), MAX_AUTO_WORKERS
    ), f"auto: {n} CPUs ({how}) - 1 for the main process, at most {MAX_AUTO_WORKERS}"


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


def reset_peak_memory(device: torch.device) -> bool:
    """Start a run's peak-memory figures (a sweep runs many runs in one process): CUDA's peak counter,
    and on Linux the process's peak resident set (``5`` written to ``/proc/self/clear_refs`` resets
    VmHWM). False where the CPU figure cannot be reset (then the record keeps the process's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_kb() is not None
    except OSError:
        return False


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mb(device: torch.device, reset: bool = False) -> dict:
    """The record's ``peak_memory_mb``. ``cpu_rss``: the run's peak resident memory (MiB) where
    :func:`reset_peak_memory` could reset it at the run's start (``reset``), else null, and then
    ``cpu_rss_process`` is the process's peak since it started (in a sweep in one process: the largest of
    every run so far). ``cuda``: the peak of memory allocated on the run's GPU since the run's start."""
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    out = {"cpu_rss": None, "cuda": None if cuda is None else round(cuda, 1)}
    hwm = _vm_hwm_kb() if reset else None
    if hwm is not None:
        out["cpu_rss"] = round(hwm / 1024, 1)
    else:
        # kilobytes on Linux
        out["cpu_rss_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out
