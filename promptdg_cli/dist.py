"""torch.distributed plumbing: one process per GPU under ``torchrun``, and nothing at all otherwise.

``torchrun --nproc_per_node=N -m promptdg_cli train ...`` starts N copies of the same command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment
(a submitit job with N tasks gets the same variables from ``_adopt_submitit_tasks``).
Every rank composes the same Hydra config and so the same run directory; :func:`init` (called by the
engine) joins the process group: NCCL when the run's device is a GPU (rank r uses ``cuda:LOCAL_RANK``),
gloo on the CPU. Without those variables (a plain ``promptdg train``) every helper here is the identity
and no collective is ever issued, so single-process runs are bit-for-bit what they were.

Semantics (data parallel, "DDP"): every rank draws the same global batch (the per-epoch permutations
are seeded by (seed, epoch)) and trains on its contiguous shard of it (:func:`shard`). A rank's loss
is its share of the global batch mean, ``mean over its shard · n_local / n_global``, and gradients
are **summed** over ranks (:func:`sync_grads`, or :func:`ddp` whose communication hook sums instead
of averaging), so the update equals the single-process update on the whole batch, also for a last,
uneven batch: the global batch size and the learning rate stay those of the config. Only rank 0
writes files; metrics are reduced (:func:`all_sum`) or gathered so every rank holds the same values
and takes the same decisions (model selection, stopping).

``PROMPTDG_DIST_TIMEOUT_MIN`` (default 60) bounds how long a rank waits in one collective. While rank 0
alone fills the feature cache the others wait outside any collective (:func:`main_first` polls the
job's store), up to ``PROMPTDG_CACHE_WAIT_S``.
"""
from __future__ import annotations

import atexit
import datetime
import os
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

_device: Optional[torch.device] = None  # where collectives put their tensors (the rank's GPU for NCCL)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun; a multi-task submitit job sets it too)."""
    _adopt_submitit_tasks()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _adopt_submitit_tasks() -> None:
    """A submitit job with several tasks (``hydra.launcher.tasks_per_node=N`` on one node, N GPUs):
    each task is one rank. submitit names the ranks (SLURM_PROCID, ...); torch's env:// init needs
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which submitit's helper exports."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_FOLDER" not in os.environ:
        return
    try:
        import submitit

        if submitit.JobEnvironment().num_tasks <= 1:
            return
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception:  # not really in a submitit job: a plain single process
        return


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init(device: torch.device) -> bool:
    """Join torchrun's process group once per process (idempotent); False when not under torchrun."""
    global _device
    if is_initialized():
        return True
    if env_world_size() <= 1 or not dist.is_available():
        return False
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=float(os.environ.get("PROMPTDG_DIST_TIMEOUT_MIN", "60")))
    bound: Dict[str, Any] = {"device_id": device} if cuda else {}
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **bound)
    _device = device if cuda else torch.device("cpu")
    atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _dev() -> torch.device:
    return _device or torch.device("cpu")


# --------------------------------------------------------------------- sharding
def shard_range(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous part of n items: the first n % world ranks get one more."""
    w, r = world(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items):
    """This rank's contiguous part of a global batch (tensor, array, list or range); all of it on one process."""
    if world() == 1:
        return items
    a, b = shard_range(len(items))
    return items[a:b]


# --------------------------------------------------------------------- collectives
def barrier() -> None:
    if world() > 1:
        dist.barrier(device_ids=[_dev().index]) if _dev().type == "cuda" else dist.barrier()


def all_sum(x):
    """Sum over ranks of a number, an array or a tensor (returned as the same kind); x on one process."""
    if world() == 1:
        return x
    t = torch.as_tensor(np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float64)).to(_dev())
    dist.all_reduce(t)
    if torch.is_tensor(x):
        return t.to(device=x.device, dtype=x.dtype)
    if isinstance(x, np.ndarray):
        return t.cpu().numpy().astype(x.dtype)
    if isinstance(x, (bool, int, np.integer)):
        return int(round(t.item()))
    return t.item()


def all_max(x: int) -> int:
    """Largest of an integer over ranks (e.g. a stop flag, or the signal number that asked to stop)."""
    if world() == 1:
        return x
    t = torch.tensor([int(x)], dtype=torch.int64, device=_dev())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) object on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_dev())
    return box[0]


def all_gather(obj: Any) -> List[Any]:
    """Every rank's (picklable) object, in rank order."""
    if world() == 1:
        return [obj]
    out: List[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


_main_first_calls = 0  # main_first blocks entered by this process (every rank enters the same ones in order)


@contextmanager
def main_first(what: str = "preparing"):
    """Rank 0 runs the block first (fills caches, generates data), the others after it succeeded;
    an error on rank 0 is raised on every rank instead of leaving them waiting. The others wait by
    polling the job's key-value store (torchrun's rendezvous store), not in a collective: extracting
    DomainNet's features can take longer than the collective timeout (``PROMPTDG_DIST_TIMEOUT_MIN``).
    They wait up to ``PROMPTDG_CACHE_WAIT_S`` seconds (default 7200), as a job waits for a cache file."""
    global _main_first_calls
    if world() == 1:
        yield
        return
    _main_first_calls += 1
    key, store = f"promptdg/main_first/{_main_first_calls}", _store()
    if is_main():
        try:
            yield
        except BaseException as e:
            _tell(store, key, f"{type(e).__name__}: {e}")
            raise
        _tell(store, key, None)
    else:
        err = _await(store, key, what)
        if err is not None:
            raise RuntimeError(f"rank 0 failed while {what}: {err}")
        yield


def _store():
    """The process group's key-value store (None where torch does not expose it: a collective then)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _tell(store, key: str, err: Optional[str]) -> None:
    if store is None:
        broadcast(err)
    else:
        store.set(key, "ok" if err is None else "error:" + err)


def _await(store, key: str, what: str) -> Optional[str]:
    """Rank 0's outcome of the block ``key`` (None: it succeeded), polled every 0.05 to 2 s."""
    if store is None:
        return broadcast(None)
    limit = float(os.environ.get("PROMPTDG_CACHE_WAIT_S", "7200") or 7200)
    start, poll = time.monotonic(), 0.05
    while not store.check([key]):
        if time.monotonic() - start > limit:
            raise TimeoutError(f"rank {rank()} waited {limit:.0f} s (PROMPTDG_CACHE_WAIT_S) for rank 0 {what}")
        time.sleep(poll)
        poll = min(poll * 1.5, 2.0)
    value = store.get(key).decode()
    return None if value == "ok" else value[len("error:"):]


# --------------------------------------------------------------------- gradients
def sync_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks, in one all-reduce (a missing gradient counts as
    zero: a rank whose shard was empty or unreadable still takes part). No-op on one process."""
    if world() == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_dev())
    dist.all_reduce(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i : i + n].view_as(p).to(p.device, p.dtype).clone()
        i += n


def broadcast_params(params: Iterable[torch.Tensor]) -> None:
    """Rank 0's values of ``params`` on every rank (what DDP does when it wraps a module): the
    ``sync_grads`` path keeps the ranks' copies equal only if they start equal."""
    if world() == 1:
        return
    for p in params:
        t = p.data.to(_dev())
        dist.broadcast(t, src=0)
        p.data.copy_(t.to(p.device))


def _allreduce_sum_hook(process_group, bucket):
    """DDP communication hook: sum the gradient bucket over ranks (DDP's default averages)."""
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def ddp(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel whose gradients are summed over ranks (see the
    module docstring: losses are shares of the global batch mean); the module itself on one process.
    Call it on every rank at the same point (it broadcasts rank 0's parameters), and on every rank
    run the wrapper's forward and a backward every step, even with an empty shard (``loss * 0``)."""
    if world() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    kw: Dict[str, Any] = {"device_ids": [_dev().index]} if _dev().type == "cuda" else {}
    try:  # buffers (prompt token embeddings) are equal on every rank: no sync at each forward
        wrapped = DistributedDataParallel(module, forward_sync_buffers=False, **kw)
    except TypeError:  # torch before forward_sync_buffers
        wrapped = DistributedDataParallel(module, broadcast_buffers=False, **kw)
    wrapped.register_comm_hook(None, _allreduce_sum_hook)
    return wrapped


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of this rank's CPU tensors; ``t`` on one process."""
    if world() == 1:
        return t
    return torch.cat([p for p in all_gather(t.cpu())])
