"""File locks that hold across the nodes of a shared file system (NFS, Lustre, GPFS).

A lock is a small JSON file: the holder's host, pid (and the pid's start time, against pid reuse),
its Slurm job id and restart count when it has them, a random token, the time it was taken and a
heartbeat time. While the lock is held, a daemon thread rewrites the heartbeat every
``PROMPTDG_LOCK_HEARTBEAT_S`` seconds (default 30), in place through the file descriptor the lock
was created with, so that a heartbeat can only ever land in the holder's own file.

A lock is **live**, and never taken over, when its pid is alive on this host, or (another host) when
its heartbeat is younger than ``PROMPTDG_LOCK_STALE_S`` seconds (default 300). It is **dead** when
its pid is gone on this host, or when its heartbeat (and the file's modification time) are older
than that on any host. The host name is ``socket.gethostname()`` unless ``PROMPTDG_HOSTNAME`` is set.

Protocol (every step is one atomic file-system operation, also over NFS):

1. *Create.* The record is written to a file of its own, which is then hard-linked to the lock's
   name; ``link`` fails if the name exists, so of all creators exactly one gets the lock and the
   lock is never seen half-written. (NFS: a link whose reply was lost is recognised by the link
   count 2 of the own file. Without hard links the lock is created with ``O_CREAT | O_EXCL``.)
2. *Take over.* A process that read a dead lock with token T first creates the break file
   ``.<name>.T.break1`` exclusively (``O_CREAT | O_EXCL``). Only the one process that created it
   may remove the lock: it re-reads the lock, and removes it only if it still holds T; then it
   goes back to step 1, where it competes with everyone else as a plain creator. Token T never
   returns once removed, so a late taker that gets a break file after the lock changed finds
   another token and backs off. Nothing but the lock's holder and the one break-file holder ever
   removes a lock, so two processes that read the same dead lock cannot both remove it, and no
   taker ever removes a lock other than the dead one it read. A break file whose creator died in
   the middle (older than the stale age) is skipped for the next number (``break2``, ...), which
   again has one creator.
3. *Release.* The holder stops its heartbeat and removes the lock if it still holds its token.

The protocol assumes what every heartbeat lock assumes: a process whose heartbeat is older than
the stale age is dead (its node's clock within a minute of the others').
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from .errors import ConfigError, UserError

log = logging.getLogger("promptdg.locks")

HEARTBEAT_ENV, STALE_ENV, HOSTNAME_ENV = "PROMPTDG_LOCK_HEARTBEAT_S", "PROMPTDG_LOCK_STALE_S", "PROMPTDG_HOSTNAME"
DEFAULT_HEARTBEAT_S, DEFAULT_STALE_S = 30.0, 300.0
_RECORD_SIZE = 1024  # the record is padded to this size: a heartbeat rewrite never changes the length
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


class LockHeld(UserError, RuntimeError):
    """The lock is held by a live process (``holder``)."""

    def __init__(self, message: str, holder: Optional["Holder"] = None):
        super().__init__(message)
        self.holder = holder


class RunLocked(LockHeld):
    """A run directory is being written by another live promptdg process."""


def hostname() -> str:
    return os.environ.get(HOSTNAME_ENV) or socket.gethostname()


def seconds_from_env(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{env}={raw!r} is not a number of seconds; valid: a positive number (default {default:g})")
    return value


def heartbeat_s() -> float:
    return seconds_from_env(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def stale_s() -> float:
    return seconds_from_env(STALE_ENV, DEFAULT_STALE_S)


def _pid_start(pid: int) -> Optional[int]:
    """The pid's start time (clock ticks after boot, /proc/<pid>/stat field 22); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _pid_start(pid)
    return start is None or now is None or now == start  # another process under a reused pid: dead


def _slurm_job() -> tuple[Optional[str], int]:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return os.environ.get("SLURM_JOB_ID") or None, int(restart) if restart.isdigit() else 0


@dataclass
class Holder:
    """What a lock file says about its holder."""

    token: str
    host: str = "?"
    pid: Optional[int] = None
    pid_start: Optional[int] = None
    started: float = 0.0
    heartbeat: float = 0.0
    job: Optional[str] = None
    restart: int = 0
    mtime: float = 0.0  # the lock file's modification time
    readable: bool = True

    def age(self, now: Optional[float] = None) -> float:
        """Seconds since the last sign of life: the heartbeat or the file's modification time."""
        return (time.time() if now is None else now) - max(self.heartbeat, self.mtime)

    def describe(self) -> str:
        if not self.readable:
            return f"an unreadable lock file (last modified {self.age():.0f} s ago)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", Slurm job {self.job}" if self.job else ""
        return f"process {self.pid} on {self.host}{job} (started {started}, heartbeat {self.age():.0f} s ago)"


def read_holder(path: Path, tries: int = 5) -> Optional[Holder]:
    """The lock's holder; None when there is no lock. A record read while being rewritten is read again."""
    for attempt in range(tries):
        try:
            with open(path, "rb") as f:
                raw = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(raw.decode())
            return Holder(
                token=str(rec["token"]), host=str(rec["host"]), pid=int(rec["pid"]), pid_start=rec.get("pid_start"),
                started=float(rec["started"]), heartbeat=float(rec["heartbeat"]), job=rec.get("job"),
                restart=int(rec.get("restart", 0)), mtime=mtime,
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if attempt + 1 < tries:
                time.sleep(0.05)
    return Holder(token="raw-" + hashlib.sha1(raw).hexdigest()[:16], mtime=mtime, readable=False)


class FileLock:
    """An exclusive lock on ``path`` with a heartbeat (see the module's docstring for the protocol).

    ``try_acquire()`` returns None once the lock is held, or the live holder; ``release()`` (or the
    end of a ``with`` block, whose start raises ``LockHeld``) gives it back. ``took_over`` holds the
    dead holder and the reason when this lock replaced one."""

    def __init__(self, path: Path, heartbeat: Optional[float] = None, stale: Optional[float] = None):
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s() if heartbeat is None else heartbeat
        self.stale_s = stale_s() if stale is None else stale
        self.host = hostname()
        self.token = uuid.uuid4().hex
        self.took_over: Optional[tuple[Holder, str]] = None
        self.lost: Optional[Holder] = None  # set by the heartbeat when another process holds the path
        self._fd: Optional[int] = None
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ----------------------------------------------------------------- the record
    def _record(self) -> bytes:
        job, restart = _slurm_job()
        rec = {"token": self.token, "host": self.host, "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
               "started": self._started, "heartbeat": time.time(), "job": job, "restart": restart}
        data = json.dumps(rec).encode()
        return data + b" " * (_RECORD_SIZE - 1 - len(data)) + b"\n"

    def _create(self) -> bool:
        """Step 1: create the lock file, complete, under the lock's name; False if the name exists."""
        self._started = time.time()
        own = self.path.with_name(f".{self.path.name}.{self.token}.new")
        fd = os.open(own, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        won, linked = False, True
        try:
            os.write(fd, self._record())
            os.fsync(fd)
            try:
                os.link(own, self.path)
                won = True
            except FileExistsError:
                won = os.fstat(fd).st_nlink == 2  # NFS: the link succeeded but its reply was lost
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise
                linked = False
        finally:
            os.unlink(own)
            if not won:
                os.close(fd)
        if won:
            self._fd = fd
            return True
        return False if linked else self._create_exclusive()

    def _create_exclusive(self) -> bool:
        """Step 1 where the file system has no hard links: O_EXCL on the lock's name itself."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        os.write(fd, self._record())
        os.fsync(fd)
        self._fd = fd
        return True

    # ----------------------------------------------------------------- liveness and takeover
    def dead_reason(self, holder: Holder) -> Optional[str]:
        """Why ``holder`` is dead; None when it is live (or may be)."""
        if holder.readable and holder.host == self.host:
            assert holder.pid is not None  # (a readable lock file names its process)
            if _pid_alive(holder.pid, holder.pid_start):
                return None
            return f"its process {holder.pid} on this host ({self.host}) is gone"
        age = holder.age()
        if age > self.stale_s:
            return f"no heartbeat for more than {self.stale_s:.0f} s ({STALE_ENV})"
        return None

    def _break_file(self, token: str, k: int) -> Path:
        return self.path.with_name(f".{self.path.name}.{token}.break{k}")

    def take_over(self, dead: Holder) -> bool:
        """Step 2: remove the lock ``dead`` (as read before) if this process is its one breaker.
        True when this process removed it; False when another did or the lock changed."""
        k = 1
        while True:
            brk = self._break_file(dead.token, k)
            try:
                fd = os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                try:
                    age = time.time() - brk.stat().st_mtime
                except FileNotFoundError:  # the breaker finished and cleaned up: the lock changed
                    return False
                if age <= self.stale_s:
                    return False  # another process is taking it over
                k += 1  # a breaker that died in the middle: the next number has one creator again
        os.write(fd, f"{self.host} {os.getpid()}\n".encode())
        os.close(fd)
        now = read_holder(self.path)
        removed = now is not None and now.token == dead.token
        if removed:
            os.unlink(self.path)  # only this process may: it holds the dead token's break file
        for j in range(1, k + 1):  # the token is gone for good: its break files are no longer needed
            self._break_file(dead.token, j).unlink(missing_ok=True)
        return removed

    # ----------------------------------------------------------------- acquire and release
    def try_acquire(self) -> Optional[Holder]:
        """Take the lock (a dead holder's too): None when held, else the live holder."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = None
        for _ in range(20):  # each round: another process created, released or took over the lock
            if self._create():
                self._start_heartbeat()
                return None
            holder = read_holder(self.path)
            if holder is None:
                continue  # released in between
            reason = self.dead_reason(holder)
            if reason is None:
                return holder
            if self.take_over(holder):
                log.warning("%s: taking over the lock of %s: %s", self.path, holder.describe(), reason)
                self.took_over = (holder, reason)
        return holder

    def acquire(self, wait: float = 0.0, poll: float = 1.0) -> "FileLock":
        """Take the lock, waiting up to ``wait`` seconds for a live holder to leave or die;
        raises ``LockHeld`` after that."""
        deadline = time.time() + wait
        while True:
            holder = self.try_acquire()
            if holder is None:
                return self
            if time.time() >= deadline:
                raise LockHeld(f"{self.path} is held by {holder.describe()}", holder)
            time.sleep(min(poll, max(deadline - time.time(), 0.01)))

    def release(self) -> None:
        """Step 3: stop the heartbeat and remove the lock if it is still this process's."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = read_holder(self.path)
        if now is not None and now.token == self.token:
            self.path.unlink(missing_ok=True)
        elif now is not None:
            log.error("%s: the lock was taken over by %s while this process held it", self.path, now.describe())
        os.close(self._fd)
        self._fd, self._thread = None, None
        self._stop = threading.Event()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> Literal[False]:
        self.release()
        return False

    # ----------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(
            target=self._beat, name=f"promptdg-lock-heartbeat {self.path.name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        fd, stop = self._fd, self._stop
        assert fd is not None  # (started once the lock is held)
        while not stop.wait(self.heartbeat_s):
            try:
                os.pwrite(fd, self._record(), 0)  # the own inode: never another process's lock
                os.fsync(fd)
                now = read_holder(self.path)
                if self.lost is None and now is not None and now.token != self.token:
                    self.lost = now
                    log.error(
                        "%s: the lock was taken over by %s (this process's heartbeat was late)",
                        self.path,
                        now.describe(),
                    )
            except OSError as e:  # a file-system hiccup: the next beat tries again
                log.warning("%s: heartbeat failed: %s", self.path, e)


# --------------------------------------------------------------------- the run directory's lock
def run_lock(run_dir: Path) -> FileLock:
    """The lock of a run directory, taken (``RunLocked`` when a live process holds it).

    An earlier attempt of the same Slurm job (a requeue after a hard kill, whose heartbeat may still
    look fresh) is waited for until its heartbeat goes stale, instead of refusing the requeued job."""
    lock = FileLock(Path(run_dir) / ".lock")
    holder = lock.try_acquire()
    if holder is None:
        return lock
    job, restart = _slurm_job()
    if job and holder.job == job and holder.restart < restart:
        wait = max(lock.stale_s - holder.age(), 0.0) + 2 * lock.heartbeat_s
        log.warning(
            "%s: held by %s, an earlier attempt of this requeued Slurm job; "
            "waiting up to %.0f s for its heartbeat to go stale",
            lock.path,
            holder.describe(),
            wait,
        )
        try:
            return lock.acquire(wait=wait, poll=min(lock.heartbeat_s, 10.0))
        except LockHeld as e:
            assert e.holder is not None  # (acquire names the holder)
            holder = e.holder
    raise RunLocked(
        f"{run_dir} is in use by {holder.describe()}: another promptdg process is running this config. "
        f"Wait for it to finish or stop it. A lock whose process has died is taken over: at once on the same "
        f"host, from another host once its heartbeat is older than {lock.stale_s:.0f} s ({STALE_ENV}).",
        holder,
    )
