"""The one line a run prints after its first logged window: how many steps it has and how long they will take."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """A rough human duration: '40 s', '12 min', '3.4 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def steps_estimate(window_steps: int, window_s: float, done: int, total: int, per_epoch: int) -> str | None:
    """The line after the first window of `window_steps` steps that took `window_s` seconds, `done` steps of
    `total` behind (this window's included); None when nothing is left. The pace of one early window (it may
    include compilation or a cold cache, and evaluation is not counted) makes it a rough estimate."""
    left = total - done
    if left <= 0 or window_steps <= 0:
        return None
    per_step = window_s / window_steps
    return (f"{total} steps ({per_epoch} per epoch x {total // max(1, per_epoch)} epochs), {left} to go: about "
            f"{duration(per_step * left)} of training at {per_step:.3g} s per step (the pace of the first "
            f"{window_steps} step{'s' if window_steps != 1 else ''}; evaluation not included)")
