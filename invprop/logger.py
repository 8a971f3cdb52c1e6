"""Live run logging for TensorBoard (the default) or Weights & Biases (offline, optional), main rank only.

`MetricsLog` hands every metrics.jsonl record to the logger, so the curves a logger shows are exactly the
file's lines, at the same steps. Besides scalars a logger takes a grid of augmented views and the resolved
config once at the start of a fresh run. `logger=none` builds a `NullLogger` that does nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from invprop.config.schema import Config

# Record keys that are not curves: the x-axis and the wall clock (passed as the event time instead).
NOT_SCALARS = ("step", "time")


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics.jsonl record that become curves."""
    return {k: float(v) for k, v in record.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def wandb_missing_message() -> str | None:
    """One line when logger=wandb cannot work here, else None."""
    if importlib.util.find_spec("wandb") is None:
        return ("logger=wandb needs the wandb package, which is not installed: pip install wandb, "
                "or use logger=tensorboard / logger=none")
    return None


class NullLogger:
    """logger=none, and every rank but the main one."""

    active = False
    views = 0  # augmented views in the grid logged at the start

    def record(self, record: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl record (its numeric values, at its `step`)."""

    def resume_after(self, step: int) -> None:
        """A resumed run continues from `step`: what was logged past it is dropped from the curves."""

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """A CHW float image in [0, 1]."""

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text."""

    def close(self) -> None:
        """Flush and release files; later calls reopen."""


class TensorBoardLogger(NullLogger):
    """Event files in `log_dir` via torch's SummaryWriter, opened on the first write.

    A resumed run opens a new event file with purge_step = resumed step + 1: TensorBoard then hides the events
    the interrupted run wrote past the checkpoint, as metrics.jsonl drops those lines, so no step appears twice.
    """

    active = True

    def __init__(self, log_dir: Path, flush_every_record: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.flush_every_record = flush_every_record
        self._writer: Any = None
        self._purge_step: int | None = None
        self._last_step: dict[str, int] = {}

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
            self._purge_step = None  # the marker belongs in the first file after a resume only
        return self._writer

    def record(self, record: dict[str, Any]) -> None:
        step, wall = int(record["step"]), record.get("time")
        writer = self._open()
        for tag, value in record_scalars(record).items():
            # The end-of-epoch kNN line repeats the window line's `epoch` at the same step; TensorBoard would
            # draw both points, so a tag is only written when its step advances.
            if self._last_step.get(tag, -1) >= step:
                continue
            self._last_step[tag] = step
            writer.add_scalar(tag, value, step, walltime=wall)
        if self.flush_every_record:  # the event file keeps pace with metrics.jsonl (one flush per log window)
            writer.flush()

    def resume_after(self, step: int) -> None:
        self.close()
        self._purge_step = step + 1
        self._last_step = {}

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self._open().add_image(tag, grid.detach().float().clamp(0, 1).cpu(), step)
        self._writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self._open().add_text(tag, text, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbLogger(NullLogger):
    """Weights & Biases in offline mode (sync later with `wandb sync`); files under `<run>/wandb`.

    wandb cannot drop logged steps: a resumed run resumes the same run id and wandb ignores the steps it
    has already seen, so the curve keeps the interrupted run's values up to where it stopped.
    """

    active = True

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]) -> None:
        import wandb

        run_dir = Path(run_dir)
        # One id per run directory, so a requeued job continues the same wandb run.
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(mode="offline", dir=str(run_dir), project=project, name=run_dir.name, id=run_id,
                               resume="allow", config=config)
        self._wandb = wandb
        self._last_step = -1

    def record(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        values = {k: v for k, v in record_scalars(record).items() if math.isfinite(v)}
        if step < self._last_step:
            return  # wandb drops steps that go back (with a warning); say nothing twice
        # commit=False: lines of one step (the window and the epoch kNN) form one row, committed when a later
        # step arrives or at finish()
        self._run.log(values, step=step, commit=False)
        self._last_step = step

    def resume_after(self, step: int) -> None:
        self._last_step = step

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        array = (grid.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).astype("uint8")
        if step >= self._last_step:
            self._run.log({tag: self._wandb.Image(array)}, step=step, commit=False)
            self._last_step = step

    def text(self, tag: str, text: str, step: int) -> None:
        self._run.summary[tag] = text

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def build_logger(cfg: Config, run_dir: Path, enabled: bool = True) -> NullLogger:
    """The logger the run config's `logger` group names; a NullLogger off the main rank. `logger.views` sets
    how many augmented views the start grid shows."""
    section = cfg.logger
    if not enabled or section.name == "none":
        return NullLogger()
    if section.name == "tensorboard":
        logger: NullLogger = TensorBoardLogger(Path(run_dir) / str(section.dir))
    else:
        missing = wandb_missing_message()
        if missing:
            raise RuntimeError(missing)
        from omegaconf import OmegaConf

        logger = WandbLogger(Path(run_dir), str(section.project),
                             OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True))
    logger.views = int(section.views)
    return logger


def views_grid(views: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], count: int) -> torch.Tensor:
    """The first `count` normalised views as one CHW image in [0, 1], 8 per row, on a white 2-px grid."""
    x = views[:count].detach().float().cpu()
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return tile((x * s + m).clamp(0, 1), per_row=8, gap=2, fill=1.0)


def tile(images: torch.Tensor, per_row: int, gap: int, fill: float) -> torch.Tensor:
    """N x C x H x W images as one C x H' x W' picture, `per_row` across, `gap` pixels of `fill` around each (grey
    images become RGB)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    across = min(per_row, n)
    down = -(-n // across)
    grid = images.new_full((c, down * (h + gap) + gap, across * (w + gap) + gap), fill)
    for k in range(n):
        top, left = gap + (k // across) * (h + gap), gap + (k % across) * (w + gap)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def config_markdown(yaml_text: str) -> str:
    """The resolved config as a markdown code block (TensorBoard's text tab renders markdown)."""
    return "\n".join("    " + line for line in yaml_text.splitlines())
