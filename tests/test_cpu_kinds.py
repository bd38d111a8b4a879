"""`make test-cpu-kinds` really makes PyTorch sum as another CPU kind: the Makefile's environments
change the capability PyTorch reports (and with it the kernels of every numerics test)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"


def make_env(name: str) -> dict:
    line = re.search(rf"^{name}\s*:=\s*(.+)$", MAKEFILE.read_text(), re.M).group(1)
    return dict(pair.split("=", 1) for pair in line.split())


@pytest.mark.parametrize("name, capability", [("AVX2_ENV", "AVX2"), ("DEFAULT_ENV", "DEFAULT")])
def test_the_makefile_environments_select_that_cpu_kind(name, capability):
    env = make_env(name)
    assert set(env) == {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == capability


def test_the_ci_runs_the_numerics_tests_as_other_cpu_kinds():
    ci = (MAKEFILE.parent / ".ci" / "run").read_text()
    assert "make test\n" in ci and "make test-cpu-kinds" in ci
    target = re.search(r"^test-cpu-kinds:.*\n((?:\t.*\n)+)", MAKEFILE.read_text(), re.M).group(1)
    assert "$(AVX2_ENV)" in target and "$(DEFAULT_ENV)" in target and target.count("-m numerics") == 2
