"""`triton`: the fused exact top-M of invprop/kernels/topm.py. On CUDA one Triton kernel scores a float16 copy of
the shard against the queries and keeps only the entries at or above a certified per-query threshold in a
compact buffer (the Q x n_local scores never reach memory), which is rescored in float32; a query whose buffer
cannot prove its top-M (too few entries, or an overflow) is redone with `topk`. Where there is no GPU it runs
the same contract in torch (or in Triton's interpreter, when TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from invprop.bank.select.base import Selected, Selection
from invprop.bank.select.mirror import HalfMirror
from invprop.kernels import topm as fused


def backend_for(device: torch.device) -> str:
    """The Triton kernels on CUDA (and on the CPU in Triton's interpreter), else their torch equivalent."""
    if not fused.available():
        return "torch"
    if device.type == "cuda":
        return "triton"
    import triton

    return "triton" if triton.knobs.runtime.interpret else "torch"


class FusedTopM(HalfMirror, Selection):
    """The fused selection. Keeps a float16 copy of the rows and their largest norm current through the bank's
    update hook (as the filter does); `redone` counts the queries that took the exact fallback, over all calls.
    More than a quarter of a call's queries redone sets `retune_requested`."""

    name = "triton"

    def __init__(self, **kernel_args: int) -> None:
        self.kernel_args = kernel_args  # block sizes of the Triton kernels (tests: small ones for the interpreter)
        self.retune_requested = False
        self.redone = self.calls = 0
        self.forget_rows()

    def select(self, zq: torch.Tensor, rows: torch.Tensor, start: int, m: int) -> Selected:
        backend = backend_for(zq.device)
        half, max_norm = self.half_rows(rows)
        found = fused.topm(zq, rows, m, low=half, max_norm=max_norm, id0=start, backend=backend,
                           **(self.kernel_args if backend == "triton" else {}))
        self.calls += 1
        self.redone += found.redone
        if found.redone > zq.shape[0] // 4:
            self.retune_requested = True
        return found.vals, found.ids, False
