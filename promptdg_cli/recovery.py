"""Files left unreadable by a crash, a full disk or a lost node, and what was done about them.

Every recovery is logged as a warning and returned as an event, ``{"file", "error", "action"}``,
which the engine adds to the run's record (``results.json``: ``recovered``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from PIL import Image

log = logging.getLogger("promptdg.recovery")


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
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return f"{type(e).__name__}: {e}"
