"""Learning-rate schedules, as pure functions of the step."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up to `base_lr` over the first `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))
