"""Shell completion: the script Hydra installs registers `promptdg`, and the query it sends
(`promptdg -sc query=bash` with the line in $COMP_LINE) reaches the right command's app."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from promptdg_cli.cli import main

BIN = Path(sys.executable).parent  # the venv's bin/, where the `promptdg` entry point is


@pytest.mark.parametrize(
    "argv", [["-sc", "install=bash"], ["train", "-sc", "install=bash"], ["eval", "-sc", "install=bash"]]
)
def test_the_installed_script_registers_promptdg_itself(argv, capsys):
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # `complete ... -F hydra_bash_completion promptdg`: not `promptdg train` (two programs, one of them `train`)
    assert last.split()[-2:] == ["hydra_bash_completion", "promptdg"]


def _query(line: str, capsys, monkeypatch) -> set:
    monkeypatch.setenv("COMP_LINE", line)
    assert main(["-sc", "query=bash"]) == 0
    return set(capsys.readouterr().out.split())


def test_a_query_completes_commands_then_each_commands_config(capsys, monkeypatch):
    assert _query("promptdg ", capsys, monkeypatch) == {"train", "eval", "generate", "collect"}
    assert _query("promptdg ev", capsys, monkeypatch) == {"eval"}
    assert _query("promptdg train method=co", capsys, monkeypatch) == {"method=coop"}
    assert _query("promptdg eval backbone=vit_b", capsys, monkeypatch) == {"backbone=vit_b16", "backbone=vit_b32"}
    assert _query("promptdg generate dataset=pa", capsys, monkeypatch) == {"dataset=pacs"}
    assert _query("promptdg train seed=1 logger=", capsys, monkeypatch) == {
        "logger=csv",
        "logger=mlflow",
        "logger=tensorboard",
        "logger=wandb",
    }
    assert _query("promptdg collect runs/ meth", capsys, monkeypatch) == {"method="}
    assert "--columns" in _query("promptdg collect --c", capsys, monkeypatch)
    assert _query("promptdg collect ", capsys, monkeypatch) == set()  # a folder: the shell completes file names


def test_an_invalid_completion_flag_names_the_valid_ones(capsys):
    assert main(["-sc", "query=tcsh"]) == 2
    err = capsys.readouterr().err
    assert "query=tcsh" in err and "install=SHELL" in err and "bash, zsh, fish" in err


def test_bash_completes_through_the_installed_function():
    """The whole path a user takes: eval the installed script in bash, then ask its function."""
    script = (
        'eval "$(promptdg -sc install=bash)"\n'
        'for line in "promptdg tr" "promptdg train method=co" "promptdg eval backbone=vit_l"; do\n'
        '  COMP_LINE="$line"; COMP_POINT=${#line}; words=($line); COMP_CWORD=$((${#words[@]} - 1))\n'
        '  hydra_bash_completion; echo "${COMPREPLY[*]}"\n'
        "done\n"
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["train", "method=coop", "backbone=vit_l14"]
