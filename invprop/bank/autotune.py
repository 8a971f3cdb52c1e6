"""`bank.selection=auto`: which exact selection this device runs (docs/DESIGN.md, "Selection strategies")."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from invprop.bank.select import Selected, Selection
from invprop.bank.select.fused import backend_for

TUNED = ("topk", "bound", "filter")


def candidates(device: torch.device) -> tuple[str, ...]:
    """What `auto` times on `device`: the three torch strategies, and the fused Triton kernel on CUDA only
    (elsewhere it would time Triton's interpreter or the kernel's torch stand-in)."""
    return TUNED + ("triton",) if device.type == "cuda" and backend_for(device) == "triton" else TUNED


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


class AutoSelect:
    """The CPU uses `bound` (fastest there, measured by tools/bench_bank.py) unless `tune_on_cpu`; an accelerator
    decides on steady-state timings of real calls: the first `warmup_calls` calls run the candidates in turn
    untimed (first-call costs: allocations, the float16 copies, Triton's compilation), the next ones run them in
    turn timed until each has `timed_calls` timings, and the candidate of least median time is kept. It measures
    again when a strategy asks for it (`retune_requested`), at most once every `retune_after_calls` calls.
    Local work only, no collective: ranks may choose differently and still agree on results."""

    def __init__(self, selections: Mapping[str, Selection], *, tune_on_cpu: bool = False,
                 retune_after_calls: int = 200, warmup_calls: int = 1, timed_calls: int = 3,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.selections = selections
        self.clock = clock  # seconds; injectable so a test can make the timings deterministic
        self.tune_on_cpu, self.retune_after_calls = tune_on_cpu, retune_after_calls
        self.warmup_calls, self.timed_calls = warmup_calls, timed_calls
        self.tuned: str | None = None  # what it chose on this device (None: not measured yet)
        self.tuning_ms: dict[str, float] = {}  # median ms per call it measured
        self.calls = 0
        self.tuned_at = 0  # `calls` when the last measurement ended
        self.measurements = 0  # measurements finished
        self.last: str | None = None  # the strategy of the latest call
        self._started = 0  # `calls` when the measurement under way began
        self._samples: dict[str, list[float]] = {}

    def select(self, zq: torch.Tensor, run: Callable[[str], Selected]) -> Selected:
        """This call's selection on queries `zq` (`run(name)` runs strategy `name` on them), timed while measuring."""
        self.last = self._pick(zq)
        return self._run(zq, self.last, run)

    def _pick(self, zq: torch.Tensor) -> str:
        """The strategy of this call (advancing the measurement when one is under way)."""
        if zq.device.type == "cpu" and not self.tune_on_cpu:
            return "bound"
        self.calls += 1
        asked = any(s.retune_requested for s in self.selections.values())
        if self.tuned is not None and asked and self.calls - self.tuned_at >= self.retune_after_calls:
            self.tuned = None  # the scores have changed since the last measurement: measure again
            self._samples = {}
        if self.tuned is not None:
            return self.tuned
        names = candidates(zq.device)
        if not self._samples:
            self._started, self._samples = self.calls, {name: [] for name in names}
        return names[(self.calls - self._started) % len(names)]

    def _run(self, zq: torch.Tensor, name: str, run: Callable[[str], Selected]) -> Selected:
        """run(name), timed when this call is one of the measurement's timed calls."""
        turn = self.calls - self._started
        if not self._samples or turn < self.warmup_calls * len(self._samples):
            return run(name)
        self._wait(zq)
        start = self.clock()
        out = run(name)
        self._wait(zq)
        self._samples[name].append((self.clock() - start) * 1000)
        if all(len(s) >= self.timed_calls for s in self._samples.values()):
            self._keep({n: _median(s) for n, s in self._samples.items()})
            self.tuned_at, self._samples = self.calls, {}
        return out

    def choose(self, zq: torch.Tensor, run: Callable[[str], object]) -> str:
        """The strategy of this call where one must be named before running it: the chosen one, or (before any
        measurement) one measured here and now on these queries."""
        if zq.device.type == "cpu" and not self.tune_on_cpu:
            return "bound"
        if self.tuned is None:
            self.measure(zq, run)
            self.tuned_at = self.calls
        return self.tuned

    def measure(self, zq: torch.Tensor, run: Callable[[str], object], repeats: int = 2) -> str:
        """Time each strategy on these queries now (one warm-up call, then the best of `repeats`) and keep the
        fastest: a quick first guess; `select` measures over real calls instead."""
        timings = {}
        for name in candidates(zq.device):
            run(name)
            best = float("inf")
            for _ in range(repeats):
                self._wait(zq)
                start = self.clock()
                run(name)
                self._wait(zq)
                best = min(best, self.clock() - start)
            timings[name] = best * 1000
        return self._keep(timings)

    def _keep(self, timings: dict[str, float]) -> str:
        """Keep the fastest; the others drop what they derived from the rows (float16 copies of the shard)."""
        self.tuning_ms = timings
        self.tuned = min(timings, key=timings.__getitem__)
        self.measurements += 1
        for name, selection in self.selections.items():
            selection.retune_requested = False
            if name != self.tuned:
                selection.forget_rows()
        return self.tuned

    @staticmethod
    def _wait(zq: torch.Tensor) -> None:
        if zq.device.type == "cuda":
            torch.cuda.synchronize(zq.device)
