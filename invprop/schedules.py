"""Learning-rate schedules, as pure functions of the step: pretraining's warm-up + cosine, and the evaluation
probes' cosine and step (milestone) factors on their base rates."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up to `base_lr` over the first `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def cosine_factor(step: int, total: int) -> float:
    """The factor on a base rate that falls from 1 at step 0 to 0 at `total` along a half cosine."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


def milestone_factor(progress: float, milestones: list[float], gamma: float) -> float:
    """Step schedule: ``gamma`` to the number of milestones reached at ``progress`` (epochs, fractional)."""
    return gamma ** sum(1 for m in milestones if m <= progress)


def scaled_milestones(milestones: list[float], written_for: float | None, epochs: int) -> list[float]:
    """Milestones (in epochs) stretched from a ``written_for``-epoch schedule to ``epochs``; unchanged when
    ``written_for`` is null/0 or equal to ``epochs``. The result may be fractional (applied per step)."""
    if not written_for or float(written_for) == float(epochs):
        return sorted(float(m) for m in milestones)
    return sorted(float(m) * epochs / float(written_for) for m in milestones)
