"""What a run needs from its process: the device, memory and revision facts, atomic torch files,
and the preemption signals.

Preemption and requeue. While a method trains, SIGTERM, SIGUSR1 and SIGUSR2 only set a flag
(:data:`STOP`); elsewhere in a run, where nothing is in progress that a checkpoint could keep (features
being extracted, a model being evaluated), they stop the run at once. The training loop polls the
flag at every step boundary (``training.TrainContext``): there the checkpoint is written and
:class:`Preempted` is raised; the runner records ``status: preempted`` (the run is resumable),
restores the handlers installed before, calls the previous handler of that signal ("chaining") and,
if that returns, exits with 128 + the signal number. Rerunning the same command (same config, same
run directory) resumes from the checkpoint at the exact step (the epoch's order is seeded by
(seed, epoch)), so the result equals an uninterrupted run's.

With hydra-submitit-launcher (submitit 1.5) the job process runs submitit's ``process_job``, which
installs ``checkpoint_and_try_requeue`` on the preemption signal (SIGUSR2 by default, or
$SUBMITIT_PREEMPT_SIGNAL) and a logging-only ``bypass`` on SIGTERM. promptdg's handlers replace those
for the duration of a run and remember them: on the signal the step finishes and the checkpoint is
written first, then submitit's handler runs (it requeues the job and exits). Under torchrun a signal
may reach some ranks only; the flag is all-reduced (max) at every safe point, so every rank stops at
the same step.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict

import torch

from . import dist
from .errors import ConfigError

log = logging.getLogger("promptdg")
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


# --------------------------------------------------------------------- device and facts
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
            raise ConfigError(f"device={name!r} under torchrun: rank {local_rank} of this node would use cuda:{index} (cuda:N is the "
                              f"job's first GPU, rank r uses cuda:N+r), but {cuda_count} GPU(s) are visible. Valid with "
                              f"{local_world} rank(s) a node: device=cuda, or cuda:N with N <= {last}")
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
    return min(max(n - 1, 0), MAX_AUTO_WORKERS), f"auto: {n} CPUs ({how}) - 1 for the main process, at most {MAX_AUTO_WORKERS}"


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
        out["cpu_rss_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kilobytes on Linux
    return out


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------- preemption
class Preempted(SystemExit):
    """Training stopped at a safe point after a preemption signal; the checkpoint is on disk.

    A ``SystemExit`` (exit code 128 + signal number), so that Hydra's job runner and submitit's
    ``process_job`` (which catch ``Exception``) neither record it as a failure nor swallow it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.signame = signal.Signals(signum).name


class StopRequest:
    """The process's preemption flag and the signal handlers a run installs for its duration."""

    def __init__(self):
        self.signum = 0  # the first preemption signal received during this run (0: none)
        self.previous: Dict[int, Any] = {}
        self.deferring = False  # True while training: stop at the next safe point, not at once

    def install(self) -> None:
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: preemption signals are not handled")
            return
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            prev = signal.getsignal(sig) if sig is not None else None
            # SIG_IGN: someone chose to ignore it; None: a handler not set from Python, not restorable
            if sig is None or prev is None or prev is signal.SIG_IGN:
                continue
            self.previous[sig] = prev
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
        if not self.deferring:  # nothing to checkpoint (files are written atomically): stop right here
            self.deferring = True  # (a second signal while stopping does not interrupt the stopping)
            raise Preempted(signum)

    @contextmanager
    def deferred(self):
        """Signals during the block (a method's fit) only ask to stop at the next safe point."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def restore(self) -> dict:
        """Put the previous handlers back and clear the flag; returns the previous handlers."""
        previous, self.previous, self.signum, self.deferring = self.previous, {}, 0, False
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        return previous

    def agreed(self) -> int:
        """The signal number that asks to stop, agreed by all ranks (collective under torchrun); 0: go on."""
        return dist.all_max(self.signum)

    def stop_here(self) -> None:
        """A safe point outside training (before a split, after fit): stop if a signal came."""
        signum = self.agreed()
        if signum:
            raise Preempted(signum)


STOP = StopRequest()


def chain_and_exit(signum: int, received: int, previous: dict) -> None:
    """After a preempted (or finished-while-asked-to-stop) run: the previous handler of the signal this
    process received (submitit's requeues and exits), then exit with 128 + signum."""
    prev = previous.get(received) if received else None
    if callable(prev):
        log.info("handing %s on to the previous handler (%s)", signal.Signals(received).name, getattr(prev, "__qualname__", prev))
        prev(received, None)
    raise Preempted(signum)
