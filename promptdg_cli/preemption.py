"""Preemption and requeue. While a method trains, SIGTERM, SIGUSR1 and SIGUSR2 only set a flag
(:data:`STOP`); elsewhere in a run, where nothing is in progress that a checkpoint could keep (features
being extracted, a model being evaluated), they stop the run at once. The training loop polls the
flag at every step boundary (``training.TrainContext``): there the checkpoint is written and
:class:`Preempted` is raised; the runner records ``status: preempted`` (the run is resumable),
restores the handlers installed before, calls the previous handler of that signal ("chaining") and,
if that returns, exits with 128 + the signal number. Rerunning the same command (same config, same
run directory) resumes from the checkpoint at the exact step (the epoch's order is seeded by
(seed, epoch)), so the result equals an uninterrupted run's.

With hydra-submitit-launcher (submitit 1.5) the job process runs submitit's ``process_job``, which
installs ``checkpoint_and_try_requeue`` on the preemption signal (SIGUSR2 by default, or
$SUBMITIT_PREEMPT_SIGNAL) and a logging-only ``bypass`` on SIGTERM. promptdg's handlers replace those
for the duration of a run and remember them: on the signal the step finishes and the checkpoint is
written first, then submitit's handler runs (it requeues the job and exits). Under torchrun a signal
may reach some ranks only; the flag is all-reduced (max) at every safe point, so every rank stops at
the same step.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Any, Dict

from . import dist

log = logging.getLogger("promptdg")
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Preempted(SystemExit):
    """Training stopped at a safe point after a preemption signal; the checkpoint is on disk.

    A ``SystemExit`` (exit code 128 + signal number), so that Hydra's job runner and submitit's
    ``process_job`` (which catch ``Exception``) neither record it as a failure nor swallow it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.signame = signal.Signals(signum).name


class StopRequest:
    """The process's preemption flag and the signal handlers a run installs for its duration."""

    def __init__(self) -> None:
        self.signum = 0  # the first preemption signal received during this run (0: none)
        self.previous: Dict[int, Any] = {}
        self.deferring = False  # True while training: stop at the next safe point, not at once

    def install(self) -> None:
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: preemption signals are not handled")
            return
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            prev = signal.getsignal(sig) if sig is not None else None
            # SIG_IGN: someone chose to ignore it; None: a handler not set from Python, not restorable
            if sig is None or prev is None or prev is signal.SIG_IGN:
                continue
            self.previous[sig] = prev
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
        if not self.deferring:  # nothing to checkpoint (files are written atomically): stop right here
            self.deferring = True  # (a second signal while stopping does not interrupt the stopping)
            raise Preempted(signum)

    @contextmanager
    def deferred(self):
        """Signals during the block (a method's fit) only ask to stop at the next safe point."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def restore(self) -> dict:
        """Put the previous handlers back and clear the flag; returns the previous handlers."""
        previous, self.previous, self.signum, self.deferring = self.previous, {}, 0, False
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        return previous

    def agreed(self) -> int:
        """The signal number that asks to stop, agreed by all ranks (collective under torchrun); 0: go on."""
        return dist.all_max(self.signum)

    def stop_here(self) -> None:
        """A safe point outside training (before a split, after fit): stop if a signal came."""
        signum = self.agreed()
        if signum:
            raise Preempted(signum)


STOP = StopRequest()


def chain_and_exit(signum: int, received: int, previous: dict) -> None:
    """After a preempted (or finished-while-asked-to-stop) run: the previous handler of the signal this
    process received (submitit's requeues and exits), then exit with 128 + signum."""
    prev = previous.get(received) if received else None
    if callable(prev):
        log.info(
            "handing %s on to the previous handler (%s)",
            signal.Signals(received).name,
            getattr(prev, "__qualname__", prev),
        )
        prev(received, None)
    raise Preempted(signum)
