"""Progress of a long loop (training, a feature pass, probe or fine-tune epochs), printed by the main rank only.

On a terminal: a live rich bar. Anywhere else (a SLURM log, a pipe) a bar cannot redraw and rich squeezes its
columns to nothing, so each tracked loop prints self-contained plain lines instead: every ``every_s`` seconds,
at the end of each epoch (when the loop has epochs) and when it ends, e.g.

    pretrain step 120/1170 (epoch 2/15) 10.3%  4.12 step/s  ETA 4m15s  loss 7.228  ins 6.900 ...

The rate is measured over about the last ``every_s`` seconds, the ETA is what is left at that rate. The clock is
injectable so that tests can drive it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich import get_console
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Clock = Callable[[], float]
# What follows the counts on a line; a callable is called only when it is shown (it may read a device value).
Info = str | Callable[[], str] | None


def format_duration(seconds: float) -> str:
    """``42s``, ``4m15s``, ``2h05m``, ``3d04h``: two units at most, enough for a log line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(rate: float) -> str:
    """About three significant digits, never an exponent: ``0.412``, ``4.12``, ``41.2``, ``412``, ``4120``."""
    digits = 0 if rate >= 100 else 1 if rate >= 10 else 2 if rate >= 1 else 3
    return f"{rate:.{digits}f}"


def rich_bar(*extra: ProgressColumn, percent: bool = False, **options: Any) -> Progress:
    """A live rich bar with the columns of every bar here: description, bar, done/total, the percentage when
    ``percent``, elapsed, remaining, then ``extra``; ``options`` go to rich's ``Progress``."""
    counts = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if percent:
        counts.append(TextColumn("{task.percentage:>5.1f}%"))
    return Progress(*counts, TimeElapsedColumn(), TimeRemainingColumn(), *extra, **options)


@dataclasses.dataclass(frozen=True)
class Reporter:
    """Where and how often progress is told; ``enabled=False`` (any rank but the main one) tells nothing."""

    enabled: bool = True
    console: Console | None = None  # None: rich's shared console on stdout
    clock: Clock = time.monotonic
    every_s: float = 30.0

    def track(self, label: str, total: int, *, done: int = 0, unit: str = "step",
              epoch_steps: int | None = None) -> Tracker:
        """A tracker for one loop of ``total`` units (``done`` of them already, e.g. on a resume); use it as a
        context manager. ``epoch_steps``: units per epoch, for the ``(epoch e/E)`` part and a line per epoch."""
        return Tracker(label, total, done=done, unit=unit, epoch_steps=epoch_steps, enabled=self.enabled,
                       console=self.console or get_console(), clock=self.clock, every_s=self.every_s)


SILENT = Reporter(enabled=False)


class Tracker:
    """One loop's progress: a rich bar on a terminal, plain periodic lines elsewhere, nothing when disabled."""

    def __init__(self, label: str, total: int, *, done: int = 0, unit: str = "step", epoch_steps: int | None = None,
                 enabled: bool = True, console: Console | None = None, clock: Clock = time.monotonic,
                 every_s: float = 30.0) -> None:
        self.label, self.total, self.done, self.unit = label, int(total), int(done), unit
        self.epoch_steps = int(epoch_steps) if epoch_steps else None
        self.enabled, self.clock, self.every_s = enabled, clock, float(every_s)
        self.console = console or get_console()
        self.terminal = enabled and self.console.is_terminal
        self.bar: Progress | None = None
        if self.terminal:
            self.bar = rich_bar(TextColumn("{task.fields[info]}", markup=False), console=self.console, get_time=clock)
            self.task = self.bar.add_task(escape(label), total=self.total, completed=self.done, info="")
        self.info: Info = None
        self._info_new, self._info_shown_at = False, -math.inf
        self._start()

    def _start(self) -> None:
        now = self.clock()
        self.started = now
        self.samples: deque[tuple[float, int]] = deque([(now, self.done)])  # (time, done) over ~every_s
        self.line_at, self.line_done = now, self.done

    def __enter__(self) -> Tracker:
        self._start()  # time spent between construction and the loop is not the loop's
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and self.done != self.line_done:  # stopped early (a preemption): where it stopped
            self._print_line(self.clock())

    def update(self, done: int, info: Info = None) -> None:
        """``done`` units so far; ``info`` (kept until the next one) follows the counts."""
        if not self.enabled:
            return
        self.done = int(done)
        if info is not None:
            self.info, self._info_new = info, True
        now = self.clock()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.every_s:
            self.samples.popleft()
        if self.bar is not None:
            fields = {}
            # a callable info (which may wait for the device) is called at most once a second
            if self._info_new and (not callable(self.info) or now - self._info_shown_at >= 1.0):
                fields, self._info_new, self._info_shown_at = {"info": self._info_text()}, False, now
            self.bar.update(self.task, completed=self.done, **fields)
        elif self._line_due(now):
            self._print_line(now)

    def advance(self, n: int = 1, info: Info = None) -> None:
        self.update(self.done + n, info)

    def note(self, text: str) -> None:
        """A one-off line (above the bar on a terminal)."""
        if self.enabled:
            self.console.print(text, soft_wrap=True, markup=False, highlight=False)

    # -- plain lines ------------------------------------------------------------------------------------
    def _line_due(self, now: float) -> bool:
        if self.done == self.line_done:
            return False
        epoch_end = self.epoch_steps is not None and self.done % self.epoch_steps == 0
        return self.done >= self.total or epoch_end or now - self.line_at >= self.every_s

    def _info_text(self) -> str:
        return self.info() if callable(self.info) else (self.info or "")

    def rate(self, now: float) -> float | None:
        """Units per second over the kept window (about the last ``every_s`` seconds); None before any."""
        t0, d0 = self.samples[0]
        return (self.done - d0) / (now - t0) if now > t0 and self.done > d0 else None

    def line(self, now: float) -> str:
        """The plain line for the current state at time ``now``."""
        head = f"{self.label} {self.unit} {self.done}/{self.total}"
        if self.epoch_steps:
            epochs = math.ceil(self.total / self.epoch_steps)
            head += f" (epoch {max(1, math.ceil(self.done / self.epoch_steps))}/{epochs})"
        parts = [f"{head} {100.0 * self.done / max(1, self.total):.1f}%"]
        rate = self.rate(now)
        parts.append(f"{format_rate(rate)} {self.unit}/s" if rate is not None else f"? {self.unit}/s")
        if self.done >= self.total:
            parts.append(f"done in {format_duration(now - self.started)}")
        else:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}" if rate else "ETA ?")
        info = self._info_text()
        return "  ".join(parts + ([info] if info else []))

    def _print_line(self, now: float) -> None:
        self.console.print(self.line(now), soft_wrap=True, markup=False, highlight=False)
        self.line_at, self.line_done = now, self.done
