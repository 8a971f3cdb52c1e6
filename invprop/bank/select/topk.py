"""`topk`: float32 scores in column chunks, a top-k per chunk merged into a running top-k. The other strategies
use it for their exact fallbacks."""

from __future__ import annotations

import torch

from invprop.bank.select.base import Selected, Selection


class TopK(Selection):
    """Exact float32 top-k. `chunk_elements`: scores per chunk on accelerators (default 1 GiB of float32); the
    CPU scores the whole shard at once."""

    name = "topk"

    def __init__(self, chunk_elements: int = 1 << 28) -> None:
        self.chunk_elements = chunk_elements

    def select(self, zq: torch.Tensor, rows: torch.Tensor, start: int, m: int) -> Selected:
        return (*self.exact(zq, rows, start, m), False)

    def exact(self, zq: torch.Tensor, rows: torch.Tensor, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The local float32 top-k (values, global ids; unordered) of every query in `zq`."""
        return self.chunked(zq, rows, start, k, self.chunk_for(zq, k, rows.shape[0]))

    def chunk_for(self, zq: torch.Tensor, k: int, n_local: int, bytes_per_score: int = 4) -> int:
        """Columns per chunk for `zq` (Q x D) and scores of `bytes_per_score` bytes."""
        if zq.device.type == "cpu":
            return max(n_local, 1)
        return max(self.chunk_elements * 4 // bytes_per_score // max(1, zq.shape[0]), 2 * k)

    def chunked(self, zq: torch.Tensor, rows: torch.Tensor, start: int, k: int, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k (values, global ids; unordered) of every query against `rows`, `chunk` columns at a time."""
        n_local = rows.shape[0]
        best_vals = best_ids = None
        for c0 in range(0, n_local, chunk):
            vals, cols = (zq @ rows[c0 : c0 + chunk].t()).topk(min(k, chunk, n_local - c0), dim=1, sorted=False)
            ids = cols + (start + c0)
            if best_vals is not None:
                vals, ids = torch.cat([best_vals, vals], dim=1), torch.cat([best_ids, ids], dim=1)
                vals, slot = vals.topk(min(k, vals.shape[1]), dim=1, sorted=False)
                ids = ids.gather(1, slot)
            best_vals, best_ids = vals, ids
        return best_vals, best_ids
