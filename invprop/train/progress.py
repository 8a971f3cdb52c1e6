"""A rich progress bar with the loss terms, lr and images/s; silent on every rank but the main one."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total: int, done: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 disable=not enabled)
        self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        info = None
        if record is not None:
            parts = [f"loss {record['loss']:.3f}", f"ins {record.get('loss_ins', 0):.3f}"]
            if "loss_inv" in record:
                parts.append(f"inv {record['loss_inv']:.3f}")
            parts += [f"lr {record['lr']:.4f}", f"{record['img_s']:.0f} img/s"]
            info = "  ".join(parts)
        self.progress.update(self.task, completed=step, **({"info": info} if info else {}))
        if info and self.enabled and not self.progress.console.is_terminal:
            # SLURM logs and pipes get no live bar: one plain line per logged window instead
            self.progress.console.print(f"step {step}/{self.progress.tasks[0].total:.0f}  {info}", soft_wrap=True)

    def note(self, text: str) -> None:
        """A one-off line above the bar (or in the log)."""
        if self.enabled:
            self.progress.console.print(text, soft_wrap=True)
