"""What a run takes from its machine: the GPU of each torchrun rank (``device=cuda:N``), per-run peak
memory figures, the matmul precision and the data-loading workers (all shown on the CPU)."""
from __future__ import annotations

import pytest
import torch

from promptdg_cli import devices
from promptdg_cli.errors import ConfigError

from conftest import results


# --------------------------------------------------------------------- device=cuda:N under torchrun
@pytest.mark.parametrize("name, local_rank, world, count, local_world, want", [
    ("cuda", 0, 1, 4, 1, "cuda"),  # one process: as given
    ("cuda:2", 0, 1, 4, 1, "cuda:2"),
    ("cpu", 1, 2, 0, 2, "cpu"),
    ("cuda", 0, 4, 4, 4, "cuda:0"),  # torchrun: cuda is cuda:LOCAL_RANK
    ("cuda", 3, 4, 4, 4, "cuda:3"),
    ("cuda:2", 0, 2, 4, 2, "cuda:2"),  # cuda:N is the job's first GPU on the node: rank r uses N + r
    ("cuda:2", 1, 2, 4, 2, "cuda:3"),
    ("cuda:1", 1, 8, 4, 2, "cuda:2"),  # (several nodes: the local rank counts)
])
def test_each_rank_gets_its_own_gpu(name, local_rank, world, count, local_world, want):
    assert devices.device_for_rank(name, local_rank, world, count, local_world) == want


def test_a_gpu_past_the_nodes_gpus_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"device='cuda:3' under torchrun: rank 1 of this node would use cuda:4.*"
                                          r"4 GPU\(s\) are visible.*device=cuda, or cuda:N with N <= 2"):
        devices.device_for_rank("cuda:3", 1, 2, 4, 2)
    with pytest.raises(
        ConfigError, match=r"device='cuda:5': 2 GPU\(s\) are visible. Valid: auto, cpu, cuda, cuda:0, cuda:1"
    ):
        devices.device_for_rank("cuda:5", 0, 1, 2)


# --------------------------------------------------------------------- peak memory per run
def _touch(mb: int) -> bytearray:
    buf = bytearray(mb * 2**20)
    buf[:: 4096] = b"x" * len(range(0, len(buf), 4096))  # (every page resident)
    return buf


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.skipif(
    not devices.reset_peak_memory(torch.device("cpu")), reason="the process's peak cannot be reset here"
)
def test_a_run_in_a_long_process_reports_its_own_peak_not_the_process_s(run_cli):
    buf = _touch(1200)  # an earlier run of the same process (a sweep) that needed 1.2 GB more
    del buf
    process_peak = _vm_hwm_mb()
    code, _, err, out_root = run_cli("train", "method=zeroshot", "target=sketch")
    assert code == 0, err
    (rec,) = results(out_root)
    peak = rec["peak_memory_mb"]
    assert set(peak) == {"cpu_rss", "cuda"} and peak["cuda"] is None
    assert 0 < peak["cpu_rss"] < process_peak - 800, (peak, process_peak)  # (this run adds ~200 MB)


def test_where_the_peak_cannot_be_reset_the_record_says_it_is_the_process_s(monkeypatch):
    monkeypatch.setattr(devices, "_vm_hwm_kb", lambda: None)
    assert not devices.reset_peak_memory(torch.device("cpu"))
    peak = devices.peak_memory_mb(torch.device("cpu"), reset=False)
    assert peak["cpu_rss"] is None and peak["cpu_rss_process"] > 0 and peak["cuda"] is None


def test_the_record_says_which_matmul_precision_and_loader_workers_a_run_had(run_cli):
    code, _, err, out_root = run_cli("train", "method=zeroshot", "target=sketch")  # (TINY: num_workers=0)
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["matmul_precision"] == "highest" == torch.get_float32_matmul_precision()  # auto on the CPU: plain fp32
    assert rec["data_loading"] == {"num_workers": 0, "chosen": "num_workers", "pin_memory": False}


# --------------------------------------------------------------------- matmul precision and the feature-cache key
@pytest.fixture
def restore_matmul():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def test_matmul_precision_is_set_explicitly(restore_matmul):
    assert (
        devices.set_matmul_precision("auto", torch.device("cpu")) == "highest" and not torch.backends.cudnn.allow_tf32
    )
    assert devices.set_matmul_precision("auto", torch.device("cuda")) == "high"  # TF32 on a GPU (set, not used, here)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    with pytest.raises(ConfigError, match="matmul_precision='tf32' is not valid. Valid: auto, highest, high, medium"):
        devices.set_matmul_precision("tf32", torch.device("cpu"))


def test_tf32_features_and_fp32_features_never_share_a_cache_file(clip, restore_matmul):
    from promptdg_cli.data import FeatureCache

    devices.set_matmul_precision("highest", torch.device("cpu"))
    cpu_fp32 = clip.identity()
    # (the keys of earlier versions)
    assert cpu_fp32 == {"model": "demo-clip-vit", "weights": clip.weights_id, "precision": "fp32"}
    devices.set_matmul_precision("high", torch.device("cpu"))
    tf32 = clip.identity()
    assert tf32 == {**cpu_fp32, "device": "cpu", "matmul_precision": "high", "cudnn_tf32": True}
    key = lambda ident: FeatureCache.key(ident, "demo_digits", "sketch", [], clip.preprocess)  # noqa: E731
    gpu = {**cpu_fp32, "device": "cuda", "matmul_precision": "high", "cudnn_tf32": True}
    assert len({key(cpu_fp32), key(tf32), key(gpu)}) == 3


# --------------------------------------------------------------------- num_workers=auto
@pytest.mark.parametrize(
    "environ, want",
    [
        ({}, (15, "auto: 16 CPUs (sched_getaffinity) - 1 for the main process, at most 32")),
        ({"SLURM_CPUS_PER_TASK": "8"}, (7, "auto: 8 CPUs (SLURM_CPUS_PER_TASK) - 1 for the main process, at most 32")),
        (
            {"LOCAL_WORLD_SIZE": "4"},
            (3, "auto: 4 CPUs (sched_getaffinity / 4 torchrun ranks) - 1 for the main process, at most 32"),
        ),
        # one Slurm task a rank (submitit's tasks_per_node): the task's CPUs are its own
        (
            {"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "4"},
            (3, "auto: 4 CPUs (SLURM_CPUS_PER_TASK) - 1 for the main process, at most 32"),
        ),
        ({"SLURM_CPUS_PER_TASK": "1"}, (0, "auto: 1 CPUs (SLURM_CPUS_PER_TASK) - 1 for the main process, at most 32")),
    ],
)
def test_auto_workers_come_from_the_cpus_the_job_has(monkeypatch, environ, want):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert devices.loader_workers("auto", environ) == want
    assert devices.loader_workers(3, environ) == (3, "num_workers")


def test_auto_workers_stop_at_32(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(128)))
    assert devices.loader_workers("auto", {})[0] == 32


# --------------------------------------------------------------------- loaders kept across epochs
class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        import os

        return i, os.getpid()


def _pid_collate(items):
    return [i for i, _ in items], {p for _, p in items}


def test_an_epoch_loader_keeps_its_workers_across_epochs_and_starts_new_ones_for_a_new_dataset():
    from promptdg_cli.data import EpochLoader

    pool = EpochLoader(torch.device("cpu"), _pid_collate)
    batches = [[i, i + 1] for i in range(0, 12, 2)]  # 6 batches: workers (more than 4)
    seen = []
    for epoch in range(3):
        order = batches[epoch:] + batches[:epoch]  # (each epoch its own order)
        got = list(pool.epoch("a", _Pids, order, 2))
        assert [i for b, _ in got for i in b] == [i for b in order for i in b]  # this epoch's batches, in order
        seen.append(set().union(*(p for _, p in got)))
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]  # the same two worker processes
    # a new dataset: new workers
    assert set().union(*(p for _, p in pool.epoch("b", _Pids, batches, 2))).isdisjoint(seen[0])
    import os

    # two batches: no worker
    assert set().union(*(p for _, p in pool.epoch("b", _Pids, batches[:2], 2))) == {os.getpid()}


def test_dapt_trains_the_same_with_workers_kept_across_epochs_as_in_the_main_process(run_cli):
    from safetensors.torch import load_file

    args = (
        "train",
        "method=dapt",
        "shots=2",
        "method.epochs=2",
        "method.n_visual=2",
        "method.n_ctx=2",
        "method.batch_size=4",
        "target=sketch",
    )  # 20 images: 5 batches an epoch (workers load them)
    code, _, err, out_root = run_cli(*args)  # (TINY: num_workers=0)
    assert code == 0, err
    code, _, err, _ = run_cli(*args, "num_workers=2", "force=true")
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["data_loading"]["num_workers"] == 2
    # (same config hash: the second run overwrote the first; compare with a third, in-process run)
    first = load_file(f"{rec['run_dir']}/splits/sketch/model.safetensors")
    code, _, err, _ = run_cli(*args, "num_workers=0", "force=true")
    assert code == 0, err
    second = load_file(f"{rec['run_dir']}/splits/sketch/model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
