"""Files on disk: written atomically, and found broken (what was done about them). No torch here.

Every file promptdg writes for later (results, checkpoints, cache files, generated images, sweep
reports) goes through :func:`write_atomic`, with one policy: the content is written to a temporary
file in the same folder, flushed to disk (``fsync``), optionally read back, and only then renamed
onto its name, so a reader sees the old file or the new one and a crash, a full disk or a lost node
never leaves a part of one under the real name.

A file that exists but cannot be read anyway (cut short before promptdg wrote atomically, damaged on a
network file system) is recovered by whoever reads it; each recovery is logged as a warning and
returned as an event, ``{"file", "error", "action", "time"}``, which the engine adds to the run's
record (``results.json``: ``recovered``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("promptdg.files")


# --------------------------------------------------------------------- atomic writes
def write_atomic(path: Path, write: Callable[[Path], Any], verify: Optional[Callable[[Path], Any]] = None,
                 keep_previous: Optional[Path] = None) -> None:
    """Write ``path`` atomically: ``write(tmp)`` writes a temporary file next to it, which is flushed to
    disk, read back by ``verify(tmp)`` when given (its exception leaves ``path`` as it was and is
    raised), and renamed onto ``path``. ``keep_previous``: the file ``path`` was is renamed there first
    (a checkpoint keeps its previous version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before it gets its name
        if verify is not None:
            verify(tmp)
        if keep_previous is not None and path.exists():
            move(path, keep_previous)
        move(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # (gone after the rename; left only by a failed write or check)


def move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, replacing it: atomic within one file system."""
    os.replace(src, dst)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` as ``path``, atomically (:func:`write_atomic`)."""
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON in ``path``, atomically (:func:`write_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------- files found broken
def recovery_event(file: Path, error, action: str) -> dict:
    """Log a recovery and return its event."""
    err = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    err = err.strip().splitlines()[0] if err.strip() else err
    if len(err) > 160:  # e.g. PyTorch's paragraph after "failed finding central directory"
        err = err.split(". ")[0]
    log.warning("%s could not be read (%s): %s", file, err, action)
    return {"file": str(file), "error": err, "action": action, "time": round(time.time(), 3)}


def image_error(path: Path) -> Optional[str]:
    """None when the image file decodes completely, else why not (a truncated PNG fails here)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return None
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return f"{type(e).__name__}: {e}"
