"""Training's progress: the loss terms, lr and images/s after the counts, on the main rank only; a rich bar on a
terminal, plain periodic lines in a job log (:mod:`invprop.progress`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from invprop.progress import Reporter


def record_info(record: dict[str, Any]) -> str:
    """The monitors of one logged window, as they follow the counts."""
    parts = [f"loss {record['loss']:.3f}", f"ins {record.get('loss_ins', 0):.3f}"]
    if "loss_inv" in record:
        parts.append(f"inv {record['loss_inv']:.3f}")
    parts += [f"lr {record['lr']:.4f}", f"{record['img_s']:.0f} img/s"]
    return "  ".join(parts)


class TrainProgress:
    def __init__(self, total: int, done: int, enabled: bool = True, *, epoch_steps: int | None = None,
                 report: Reporter | None = None) -> None:
        """``report``: where and how often (default: stdout, every 30 s); ``enabled=False`` silences it."""
        base = report or Reporter()
        report = dataclasses.replace(base, enabled=enabled and base.enabled)
        self.tracker = report.track("pretrain", total, done=done, unit="step", epoch_steps=epoch_steps)

    def __enter__(self) -> TrainProgress:
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracker.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        self.tracker.update(step, record_info(record) if record is not None else None)

    def note(self, text: str) -> None:
        """A one-off line above the bar (or in the log)."""
        self.tracker.note(text)
