"""One writer per run directory (placeholder until the cross-host lock lands)."""
from __future__ import annotations

import os
import socket

from .errors import RunLocked


class RunLock:
    """One process per run directory; a stale lock (dead pid on this host) is taken over."""

    def __init__(self, run_dir):
        self.path = run_dir / ".lock"

    def __enter__(self):
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, me.encode())
                os.close(fd)
                return self
            except FileExistsError:
                host, _, pid = self.path.read_text().partition(":")
                alive = host == socket.gethostname() and pid.isdigit() and _pid_alive(int(pid))
                if alive:
                    raise RunLocked(f"{self.path.parent} is being written by process {pid} on {host}; not starting a second copy.")
                self.path.unlink(missing_ok=True)
        raise RunLocked(f"could not lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
