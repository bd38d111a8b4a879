"""Records answer "what exactly ran?": package versions, CPU capability, the source tree's state;
result lines reach the job's log file. References come from the libraries and git themselves."""
import hashlib
import subprocess
from pathlib import Path

import diffusers
import open_clip
import torch
import torchvision

from promptdg_cli.environment import source_tree

from conftest import results

REPO = Path(__file__).resolve().parents[1]


def test_a_run_records_versions_hardware_and_the_tree(run_cli):
    code, out, err, out_root = run_cli("train", "method=zeroshot", "target=sketch")
    assert code == 0, err
    (rec,) = results(out_root)
    assert rec["record_version"] == 3
    env = rec["environment"]
    assert env["torch"] == torch.__version__  # (2.13.0+cpu: the local version tag names the CPU build)
    # (its wheel's metadata has no tag; __version__ does)
    assert env["torchvision"] == torchvision.__version__.split("+")[0]
    assert env["open_clip"] == open_clip.__version__ and env["diffusers"] == diffusers.__version__
    assert env["cuda"] == torch.version.cuda and env["gpu"] is None  # a CPU run
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True, text=True
    )
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    assert rec["git_dirty"] is dirty and (rec["git_diff_sha256"] is not None) == bool(dirty)
    assert rec["weights"]["kind"] == "file" and rec["weights"]["path"] == str(Path(rec["pretrained"]).resolve())
    # the result line: on the terminal once, and in the job's log file (Hydra's file handler)
    line = "[promptdg] zeroshot demo_digits target=sketch: top-1"
    assert out.count(line) == 1
    assert line in (Path(rec["run_dir"]) / "promptdg_train.log").read_text()


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, capture_output=True, check=True
    ).stdout


def test_the_tree_state_is_dirty_with_a_hash_of_the_changes(tmp_path):
    assert source_tree(tmp_path) == {"git_dirty": None, "git_diff_sha256": None}  # not a git checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-qm", "first")
    assert source_tree(repo) == {"git_dirty": False, "git_diff_sha256": None}

    (repo / "a.py").write_text("x = 2\n")
    tracked = source_tree(repo)
    assert tracked["git_dirty"] is True
    assert tracked["git_diff_sha256"] == hashlib.sha256(_git(repo, "diff", "HEAD", "--binary")).hexdigest()
    assert source_tree(repo) == tracked  # the same changes, the same hash

    (repo / "new.py").write_text("y = 1\n")  # an untracked file changes what runs too
    with_new = source_tree(repo)["git_diff_sha256"]
    assert with_new != tracked["git_diff_sha256"]
    (repo / "new.py").write_text("y = 2\n")
    assert source_tree(repo)["git_diff_sha256"] not in (with_new, tracked["git_diff_sha256"])
    (repo / ".gitignore").write_text("new.py\n")  # ignored files are not part of the tree
    ignored = source_tree(repo)["git_diff_sha256"]
    (repo / "new.py").write_text("y = 3\n")
    assert source_tree(repo)["git_diff_sha256"] == ignored
