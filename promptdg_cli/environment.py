"""What a record says about what exactly ran: the software, the hardware and promptdg's source tree.

* :func:`software`: the versions of Python, torch, torchvision, open_clip, diffusers, transformers,
  huggingface_hub and numpy (from the installed distributions; null when one is not installed), and
  of CUDA and cuDNN as torch was built with them (null on a CPU build);
* :func:`hardware`: torch's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``: DEFAULT,
  AVX2, AVX512; ``ATEN_CPU_CAPABILITY`` changes it, and with it the order in which sums are taken),
  the CPU model, and the GPU's name when the run used one;
* :func:`source_tree`: whether promptdg's git tree had changes that are not committed (tracked files
  changed, or files git does not ignore and does not track) and a SHA-256 over them (``git diff HEAD
  --binary`` and each untracked file's path and bytes), so that two runs of the same dirty tree can be
  told apart from two runs of different edits; null outside a git checkout (an installed wheel).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

# the record's name for a package -> its distribution
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "open_clip": "open_clip_torch", "diffusers": "diffusers",
            "transformers": "transformers", "huggingface_hub": "huggingface_hub", "numpy": "numpy"}
UNTRACKED_BYTES_LIMIT = 16 * 2**20  # an untracked file larger than this is hashed by its path and size only


def software() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name, dist in PACKAGES.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["cudnn"] = None if cudnn is None else str(cudnn)
    return out


def hardware(device=None) -> Dict[str, Optional[str]]:
    import torch

    gpu = None
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "cpu": _cpu_model(), "gpu": gpu}


def environment(device=None) -> Dict[str, Optional[str]]:
    """The record's ``environment``: :func:`software` and :func:`hardware` in one object."""
    return {**software(), **hardware(device)}


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _git(*args: str, cwd: Path) -> Optional[bytes]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def source_tree(path: Optional[Path] = None) -> Dict[str, Optional[object]]:
    """``{"git_dirty": bool, "git_diff_sha256": str | None}`` of the git tree holding ``path``
    (default: promptdg's own source); both null outside a git checkout."""
    cwd = Path(path or Path(__file__).parent)
    status = _git("status", "--porcelain", "--untracked-files=all", cwd=cwd)
    if status is None:
        return {"git_dirty": None, "git_diff_sha256": None}
    if not status.strip():
        return {"git_dirty": False, "git_diff_sha256": None}
    root = Path((_git("rev-parse", "--show-toplevel", cwd=cwd) or b"").decode().strip() or cwd)
    digest = hashlib.sha256(_git("diff", "HEAD", "--binary", cwd=root) or b"")
    for name in sorted((_git("ls-files", "--others", "--exclude-standard", "-z", cwd=root) or b"").split(b"\0")):
        if not name:
            continue
        file = root / name.decode(errors="surrogateescape")
        digest.update(b"\0untracked\0" + name + b"\0")
        try:
            size = file.stat().st_size
            digest.update(file.read_bytes() if size <= UNTRACKED_BYTES_LIMIT else f"size:{size}".encode())
        except OSError:  # gone meanwhile, or unreadable
            digest.update(b"unreadable")
    return {"git_dirty": True, "git_diff_sha256": digest.hexdigest()}


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
