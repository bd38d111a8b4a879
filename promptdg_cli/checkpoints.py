"""Training checkpoints that survive a crash in the middle of a write, and a file cut short later.

``save(state, path)`` writes ``state`` to a temporary file, flushes it to disk, reads it back
(``torch.load(weights_only=True)``) and only then renames the current checkpoint to
``<stem>.prev<suffix>`` (e.g. ``checkpoint.prev.pt``) and the new one to ``path``. So there is always
a checkpoint that read back when it was written: the new one, or, while it is being written or if
it fails to read back, the previous one.

``load(path)`` returns the newest checkpoint that can be read, and what it recovered from: a
checkpoint that does not read (a truncated file: PyTorch says "failed finding central directory")
is set aside as ``<stem>.corrupt<suffix>`` and the previous one is used; if none reads, there is no
state (the caller restarts from scratch). Each unreadable file is a recovery event (``recovery.py``)
that the engine adds to the run's record. ``remove(path)`` deletes a checkpoint with its previous
and set-aside copies.

Keeping the previous checkpoint doubles the disk space checkpoints take while a split trains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .files import move, recovery_event, write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint just written does not read back; the previous checkpoint is kept."""


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def corrupt_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.corrupt{path.suffix}")


def save(state: dict, path: Path) -> None:
    """Write, verify, then replace: ``path`` is the new checkpoint, its previous version ``.prev``."""
    path = Path(path)
    try:
        write_atomic(
            path,
            lambda tmp: torch.save(state, tmp),
            verify=lambda tmp: torch.load(tmp, map_location="cpu", weights_only=True),
            keep_previous=previous_path(path),
        )
    except Exception as e:
        raise CheckpointError(
            f"the checkpoint for {path} could not be written and read back ({type(e).__name__}: {e}); "
            f"the previous checkpoint is kept"
        ) from e


def load(path: Path, map_location=None, repair: bool = True) -> tuple[Optional[dict], list]:
    """(the newest readable checkpoint or None, recovery events). ``repair``: set unreadable files
    aside (only one process may, e.g. rank 0; the others read the same files and agree)."""
    path = Path(path)
    unreadable, state, used = [], None, None
    for candidate in (path, previous_path(path)):
        if not candidate.is_file():
            continue
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=True)
        except Exception as e:  # the save verified the file: an error now means the file is broken
            unreadable.append((candidate, e))
            continue
        used = candidate
        break
    if not unreadable:
        return state, []
    action = (
        f"resumed from {used.name}" if used is not None else "restarted the split from scratch (no readable checkpoint)"
    )
    events = [
        recovery_event(f, e, action + (f"; set aside as {corrupt_path(f).name}" if repair else ""))
        for f, e in unreadable
    ]
    if repair:
        for f, _ in unreadable:
            move(f, corrupt_path(f))  # never the "previous" checkpoint of the next save
    return state, events


def remove(path: Path) -> None:
    """Delete a checkpoint with its previous and set-aside copies (a finished split needs none)."""
    path = Path(path)
    for f in (path, previous_path(path), corrupt_path(path), corrupt_path(previous_path(path))):
        f.unlink(missing_ok=True)
