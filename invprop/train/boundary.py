"""What the ranks decide together at each step boundary: stop for preemption, or save a periodic checkpoint.

SLURM's USR2 (time limit near, or preemption) may land anywhere inside a step, and submitit would call
checkpoint() on rank 0 alone inside the signal handler. Here the handler only sets a flag; at the next
boundary one all-reduce(MAX) makes every rank see the same decision, so the save is collective and exact.

`stop_at_step` (`train.stop_at_step`) raises that same signal in every rank at a chosen step, so a stop, its
committed checkpoint and the requeue or rerun happen at a known step through the real handlers.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from invprop.collectives import Comm

# Stop signals that arrived before a StepBoundary existed (see `defer`).
_pending: set[int] = set()


def _remember(signum: int, frame: Any) -> None:
    _pending.add(signum)


def defer(*sigs: signal.Signals) -> None:
    """Until a StepBoundary takes over, remember `sigs` instead of dying of them: a process that is still
    starting up (imports, data) then stops at its first step boundary like one that was already training."""
    for sig in sigs:
        signal.signal(sig, _remember)


class StepBoundary:
    def __init__(self, comm: Comm, every_steps: int = 0, every_min: float = 0.0,
                 sig: signal.Signals = signal.SIGUSR2, also: tuple[signal.Signals, ...] = (),
                 stop_at_step: int | None = None) -> None:
        self.comm, self.every_steps, self.every_s = comm, every_steps, every_min * 60
        self.sig, self.stop_at_step = sig, stop_at_step
        self.preempted = bool(_pending & {sig, *also})
        self.interrupted = signal.SIGINT in _pending and signal.SIGINT in also
        _pending.difference_update({sig, *also})
        self.last_save = time.monotonic()
        self.previous: Callable[..., Any] | int | None = signal.signal(sig, self._on_signal)
        # Further signals that stop at the next boundary (SIGTERM for a local run); restored by close().
        self.also = {s: signal.signal(s, self._on_signal) for s in also}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.interrupted:  # a second Ctrl-C: stop at once, keep what is committed
            os.write(2, b"interrupted again: stopping now without a save; the last committed checkpoint is kept\n")
            os._exit(130)
        self.interrupted = self.interrupted or signum == signal.SIGINT
        self.preempted = True  # nothing else: we may be inside a collective or an optimiser step

    def poll(self, step: int) -> tuple[bool, bool]:
        """(stop now, save now), identical on every rank."""
        if step == self.stop_at_step:
            # Through the signal, not the flag: the installed handler runs as for SLURM's USR2. raise_signal
            # targets this (main) thread and runs the Python handler before it returns, so the flag is set for
            # this very poll. A resumed run starts past this step and never polls it again.
            signal.raise_signal(self.sig)
        time_due = self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        step_due = self.every_steps > 0 and step % self.every_steps == 0
        stop, timed = self.comm.host_flags_any([self.preempted, time_due])
        return stop, stop or timed or step_due

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def hand_over(self) -> None:
        """After the committed save: let the handler that was there before (submitit's) requeue the job."""
        signal.signal(self.sig, self.previous if self.previous is not None else signal.SIG_DFL)
        if callable(self.previous):
            self.previous(self.sig, None)

    def close(self) -> None:
        for sig, previous in [(self.sig, self.previous), *self.also.items()]:
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
