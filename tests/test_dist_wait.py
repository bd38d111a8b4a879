"""Under torchrun, while rank 0 alone prepares (extracts features, builds the demo models), the other
ranks wait outside any collective: a preparation longer than the collective timeout passes, and an
error on rank 0 reaches them (two gloo ranks on the CPU, a collective timeout of 3 s, a 6 s block)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torch.distributed.run")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

SCRIPT = """
import sys, time, torch
from promptdg_cli import dist
dist.init(torch.device("cpu"))
try:
    with dist.main_first("extracting image features"):
        if dist.is_main():
            time.sleep(6)  # longer than the collective timeout
            if sys.argv[1] == "fail":
                raise ValueError("disk full")
except Exception as e:
    print(f"rank {dist.rank()}: {type(e).__name__}: {e}", flush=True)
    time.sleep(4 if dist.is_main() else 0)  # (torchrun stops the other ranks once one has exited)
    sys.exit(3)
dist.barrier()
print(f"rank {dist.rank()}: done", flush=True)
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_the_other_ranks_wait_for_rank_0_past_the_collective_timeout(tmp_path, outcome):
    script = tmp_path / "prepare.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PROMPTDG_DIST_TIMEOUT_MIN": "0.05", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), outcome],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    text = out.stdout + out.stderr
    if outcome == "ok":
        assert out.returncode == 0, text[-3000:]
        assert "rank 0: done" in text and "rank 1: done" in text
    else:
        assert out.returncode != 0
        assert "rank 0: ValueError: disk full" in text
        assert "rank 1: RuntimeError: rank 0 failed while extracting image features: ValueError: disk full" in text, (
            text[-3000:]
        )
