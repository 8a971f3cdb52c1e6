"""How each rank finds its exact local top-M (`bank.selection`): one module per strategy behind `Selection`
(docs/DESIGN.md, "Selection strategies"), their settings in one `SelectSettings`."""

from __future__ import annotations

from dataclasses import dataclass

from invprop.bank.select.base import Selected, Selection
from invprop.bank.select.bound import SampledBound
from invprop.bank.select.filter import HalfFilter
from invprop.bank.select.fused import FusedTopM
from invprop.bank.select.topk import TopK
from invprop.config import BANK_SELECTIONS

# topk | bound | filter | triton, and auto (invprop/bank/autotune.py), which picks among them
SELECTIONS = BANK_SELECTIONS

__all__ = ["SELECTIONS", "FusedTopM", "HalfFilter", "SampledBound", "SelectSettings", "Selected", "Selection", "TopK",
           "build_selections"]


@dataclass(frozen=True)
class SelectSettings:
    """The strategies' settings (each documented on its class); the defaults are what training uses."""

    topk_chunk_elements: int = 1 << 28  # TopK.chunk_elements
    scan_chunk_elements: int | None = None  # SampledBound.chunk_elements
    sample_hits: int = 192
    sample_sigmas: float = 5.0
    use_numba: bool = True
    filter_max_extra: int = 8  # HalfFilter.max_extra
    filter_clean_calls: int = 100  # HalfFilter.clean_calls
    tune_on_cpu: bool = False  # AutoSelect.tune_on_cpu
    retune_after_calls: int = 200  # AutoSelect.retune_after_calls
    tune_warmup_calls: int = 1  # AutoSelect.warmup_calls (per candidate)
    tune_timed_calls: int = 3  # AutoSelect.timed_calls (per candidate)


def build_selections(settings: SelectSettings) -> dict[str, Selection]:
    """One instance of each strategy, by name; `bound` and `filter` share the `topk` they fall back to."""
    topk = TopK(settings.topk_chunk_elements)
    bound = SampledBound(topk, sample_hits=settings.sample_hits, sample_sigmas=settings.sample_sigmas,
                         use_numba=settings.use_numba, chunk_elements=settings.scan_chunk_elements)
    filt = HalfFilter(topk, max_extra=settings.filter_max_extra, clean_calls=settings.filter_clean_calls)
    return {"topk": topk, "bound": bound, "filter": filt, "triton": FusedTopM()}
