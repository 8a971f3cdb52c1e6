"""`bank.selection=auto`: which exact selection this device runs (docs/DESIGN.md, "Selection strategies")."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from invprop.bank.select import Selection

TUNED = ("topk", "bound", "filter")


class AutoSelect:
    """The CPU uses `bound` (fastest there, measured by tools/bench_bank.py) unless `tune_on_cpu`; an accelerator
    times topk, bound and filter on its first call and keeps the fastest, and measures again when a strategy asks
    for it (`retune_requested`), at most once every `retune_after_calls` calls. Local work only, no collective:
    ranks may choose differently and still agree on results."""

    def __init__(self, selections: Mapping[str, Selection], *, tune_on_cpu: bool = False,
                 retune_after_calls: int = 200) -> None:
        self.selections = selections
        self.tune_on_cpu, self.retune_after_calls = tune_on_cpu, retune_after_calls
        self.tuned: str | None = None  # what it chose on this device (None: not measured yet)
        self.tuning_ms: dict[str, float] = {}  # what it measured
        self.calls = 0
        self.tuned_at = 0  # `calls` at the last measurement

    def choose(self, zq: torch.Tensor, run: Callable[[str], object]) -> str:
        """The strategy for this call on queries `zq`; `run(name)` runs strategy `name` on them."""
        if zq.device.type == "cpu" and not self.tune_on_cpu:
            return "bound"
        self.calls += 1
        asked = any(s.retune_requested for s in self.selections.values())
        if asked and self.calls - self.tuned_at >= self.retune_after_calls:
            self.tuned = None  # the scores have changed since the last measurement: measure again
        if self.tuned is None:
            self.measure(zq, run)
            self.tuned_at = self.calls
            for selection in self.selections.values():
                selection.retune_requested = False
        return self.tuned

    def measure(self, zq: torch.Tensor, run: Callable[[str], object], repeats: int = 2) -> str:
        """Time each strategy (one warm-up call, then the best of `repeats`) and keep the fastest; the others drop
        what they derived from the rows (the filter's float16 copy of the shard)."""
        def wait() -> None:
            if zq.device.type == "cuda":
                torch.cuda.synchronize(zq.device)

        for name in TUNED:
            run(name)
            best = float("inf")
            for _ in range(repeats):
                wait()
                start = time.perf_counter()
                run(name)
                wait()
                best = min(best, time.perf_counter() - start)
            self.tuning_ms[name] = best * 1000
        self.tuned = min(self.tuning_ms, key=self.tuning_ms.__getitem__)
        for name, selection in self.selections.items():
            if name != self.tuned:
                selection.forget_rows()
        return self.tuned
