"""Optional extras: the core install runs without them, a run that needs one names it, and the
package metadata (pyproject.toml), constraints.txt and promptdg_cli/extras.py agree. The wheel ships
py.typed."""
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from promptdg_cli.extras import EXTRAS, MissingExtra, require

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# the package's metadata as pip installed it from pyproject.toml (`make install` reinstalls when it changes)
REQUIRES = importlib.metadata.metadata("promptdg").get_all("Requires-Dist")
PINS = {
    re.split(r"[=<>!~ ]", l)[0].lower().replace("_", "-"): l
    for l in (REPO / "constraints.txt").read_text().splitlines()
    if l.strip() and not l.startswith("#")
}


def _dist(requirement: str) -> str:
    return re.split(r"[\[=<>!~ ;]", requirement)[0].lower().replace("_", "-")


def test_each_extra_is_declared_pinned_and_provides_its_modules():
    optional: dict = {}
    for line in REQUIRES:
        requirement, _, marker = line.partition(";")
        extra = re.search(r'extra == "([^"]+)"', marker)
        optional.setdefault(extra.group(1) if extra else "", []).append(requirement.strip())
    provided = importlib.metadata.packages_distributions()  # module -> the installed distributions that ship it
    for extra, (modules, _) in EXTRAS.items():
        dists = {_dist(r) for r in optional[extra]}
        assert dists and all(d in PINS for d in dists), f"{extra}: {dists} not all pinned in constraints.txt"
        for module in modules:  # e.g. the module mlflow comes from the distribution mlflow-skinny
            assert {d.lower().replace("_", "-") for d in provided[module]} & dists, (
                f"{extra}: nothing in it provides {module}"
            )
    core = {_dist(r) for r in optional[""]}
    extras_only = {_dist(r) for e in EXTRAS for r in optional[e]}
    assert not core & extras_only  # the core install needs none of them
    assert PINS["torch"] == "torch==2.13.0" and PINS["torchvision"] == "torchvision==0.28.0"


def test_a_missing_extra_is_named_with_its_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(MissingExtra) as err:
        require("domainfusion", "method=domainfusion")
    assert str(err.value).startswith(
        "method=domainfusion needs diffusers, which is not installed: pip install 'promptdg[domainfusion]'"
    )
    require("plots")  # installed here: nothing raised


BLOCKED = ("diffusers", "transformers", "matplotlib", "tensorboard", "wandb", "mlflow")
CORE_ONLY = f"""
import json, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # the core install: none of the extras' packages
from promptdg_cli.cli import main
def run(*args):
    try:
        return main(list(args))
    except SystemExit as e:  # (a single run's user error exits 2)
        return e.code
codes = {{}}
codes["zeroshot"] = run("train", "method=zeroshot", "target=sketch", *sys.argv[2:])
codes["domainfusion"] = run("train", "method=domainfusion", "target=sketch", *sys.argv[2:])
codes["collect"] = run("collect", sys.argv[1])
print("CODES", json.dumps(codes))
print("LOADED", json.dumps(sorted(n for n in {BLOCKED!r} if sys.modules.get(n) is not None)))
"""


def test_the_core_install_runs_and_collects_and_names_the_extra_a_run_needs(tmp_path, shared_cache, random_clip):
    out = tmp_path / "out"
    env = {
        "PROMPTDG_CACHE": str(shared_cache),
        "PROMPTDG_OUT": str(out),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    args = [*TINY, f"backbone.pretrained={random_clip}"]
    proc = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, str(out), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert "CODES" in proc.stdout, proc.stderr[-3000:]
    codes = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("CODES"))[6:])
    assert codes == {"zeroshot": 0, "domainfusion": 2, "collect": 0}, proc.stderr[-3000:]
    assert (
        "method=domainfusion needs diffusers, transformers, which is not installed: "
        "pip install 'promptdg[domainfusion]'" in proc.stderr
    )
    assert "no results.png" in proc.stderr and "pip install 'promptdg[plots]'" in proc.stderr
    assert (out / "results.md").is_file() and not (out / "results.png").exists()
    assert json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("LOADED"))[7:]) == []


def test_the_wheel_ships_py_typed_and_the_logger_configs(tmp_path):
    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info where it runs
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("conf", "promptdg_cli"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("promptdg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "promptdg_cli/py.typed" in names
    assert {f"promptdg_cli/conf/logger/{n}.yaml" for n in ("tensorboard", "wandb", "mlflow", "csv")} <= names
    assert "promptdg_cli/tracking/backends.py" in names
