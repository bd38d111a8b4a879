"""Cache files that many jobs need and one computes: claim, compute, write, release; the others wait.

``compute_once(file, ...)`` returns the file's content, computing it only when no process has. The
first job that needs a missing file claims it (``.<name>.claim`` next to it, a ``locks.FileLock``
with a heartbeat), computes it, writes it atomically and releases the claim. The other jobs find the
claim live and poll for the file (logging once what they wait for and who computes it), for at most
``PROMPTDG_CACHE_WAIT_S`` seconds (default 7200). A claim whose process died is taken over like any
lock (at once on the same host, after ``PROMPTDG_LOCK_STALE_S`` from another host), and a job that
failed while computing releases its claim, so the next job computes the file instead.

A file that exists but cannot be read (cut short by a crash, a full disk) is deleted and computed
again by the job that claims it; the recovery is logged and returned as an event.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from .config import UserError
from .files import recovery_event, write_atomic
from .locks import STALE_ENV, FileLock, seconds_from_env

log = logging.getLogger("promptdg.cache")

T = TypeVar("T")
WAIT_ENV, DEFAULT_WAIT_S = "PROMPTDG_CACHE_WAIT_S", 7200.0
_POLL_S = (0.2, 5.0)  # the first poll interval, growing by half each time up to the second


class CacheWaitTimeout(UserError, TimeoutError):
    """Another job claimed a cache file and did not write it in time."""


def wait_s() -> float:
    return seconds_from_env(WAIT_ENV, DEFAULT_WAIT_S)


def claim_path(file: Path) -> Path:
    return file.with_name(f".{file.name}.claim")


def compute_once(file: Path, compute: Callable[[], T], write: Callable[[T, Path], None], read: Callable[[Path], T],
                 what: str, events: Optional[list] = None) -> tuple[T, bool]:
    """(the content of ``file``, whether this process computed it).

    ``compute()`` makes the content, ``write(content, path)`` writes it to ``path`` (this function
    makes the write atomic: ``files.write_atomic``), ``read(path)`` reads it back and raises
    on a broken file. ``events``: recoveries are appended to it."""
    file = Path(file)

    def ready():
        if file.exists():
            try:
                return (read(file),)
            except Exception:
                pass  # gone in between, or broken: whoever claims it deletes it and computes it again
        return None

    return _once(file, ready, lambda: _compute_claimed(file, compute, write, read, events), what)


def build_once(path: Path, done: Callable[[], bool], build: Callable[[], object], what: str) -> bool:
    """Run ``build()`` (which writes ``path``: a file or a folder) unless ``done()``; processes that
    need it at once build it once, the others wait for it (as ``compute_once``). Whether this process
    built it. The demo CLIP and the demo LDM are built this way: sweeps with parallel jobs and
    ``claims --jobs`` start several runs on an empty cache at once."""
    def claimed():
        if not done():  # (another process may have finished while this one waited for the claim)
            build()
            return True
        return False

    return _once(Path(path), lambda: (False,) if done() else None, claimed, what)[0]


def _once(path: Path, ready: Callable[[], Optional[tuple]], claimed: Callable[[], T], what: str) -> tuple:
    """The claim-or-wait loop: ``ready()`` -> (value,) when ``path`` is there and sound, else None;
    ``claimed()`` runs with ``path``'s claim held. (value, False) or (claimed(), True)."""
    limit, poll, waiting_since, holder = wait_s(), _POLL_S[0], None, None
    while True:
        got = ready()
        if got is not None:
            return got[0], False
        claim = FileLock(claim_path(path))
        holder = claim.try_acquire()
        if holder is None:
            try:
                return claimed(), True
            finally:
                claim.release()
        now = time.time()
        if waiting_since is None:
            waiting_since = now
            log.info("waiting for %s (%s): it is being computed by %s; waiting up to %.0f s (%s)",
                     what, path, holder.describe(), limit, WAIT_ENV)
        elif now - waiting_since > limit:
            raise CacheWaitTimeout(
                f"gave up waiting for {what} ({path}) after {limit:.0f} s ({WAIT_ENV}): it is being computed by "
                f"{holder.describe()}. If that process is stuck, stop it (its claim {claim.path} is then taken over); "
                f"a claim without heartbeat is taken over after {claim.stale_s:.0f} s ({STALE_ENV})."
            )
        time.sleep(min(poll, max(limit - (now - waiting_since), 0.0) + 0.01))
        poll = min(poll * 1.5, _POLL_S[1])


def _compute_claimed(file, compute, write, read, events):
    """With the claim held: the file if another job wrote it meanwhile, else compute and write it."""
    if file.exists():
        try:
            return read(file)
        except FileNotFoundError:
            pass  # removed in between: computed below
        except Exception as e:
            ev = recovery_event(file, e, "deleted and computed again")
            if events is not None:
                events.append(ev)
            file.unlink(missing_ok=True)
    value = compute()
    write_atomic(file, lambda tmp: write(value, tmp))  # a half-written cache file is never read
    return value
