"""out[q] = sum_c weights[q, c] * rows[cols[q, c]]: the gradient of selected bank scores with respect to the
queries (`invprop.bank.storage`), a weighted sum of a few thousand rows per query.

`backend="torch"` is `embedding_bag` (sum mode with per-sample weights), which reads every listed row; on
CUDA `backend="triton"` is one Triton kernel (invprop/kernels/weighted_rows_triton.py) that skips the rows of
zero weight (padding, candidates outside every mask: most of a selection's buffer) and keeps the sum on chip.
Both accumulate in float32; they differ only in summation order.
"""

from __future__ import annotations

import torch

from invprop.kernels.topm import available

BACKENDS = ("auto", "torch", "triton")


def backend_for(device: torch.device) -> str:
    """The Triton kernel on CUDA where Triton is installed, else `embedding_bag`."""
    return "triton" if device.type == "cuda" and available() else "torch"


def weighted_row_sum(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor,
                     backend: str = "auto", **kernel_args: int) -> torch.Tensor:
    """Q x D float32 sums of `rows` (N x D) at `cols` (Q x C, valid indices wherever the weight is non-zero)
    weighted by `weights` (Q x C)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if cols.shape != weights.shape or cols.dim() != 2:
        raise ValueError(f"cols {tuple(cols.shape)} and weights {tuple(weights.shape)} must be the same Q x C")
    if backend == "auto":
        backend = backend_for(rows.device)
    weights = weights.to(torch.float32).contiguous()
    if cols.numel() == 0:
        return torch.zeros(cols.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
    if backend == "triton":
        from invprop.kernels import weighted_rows_triton

        return weighted_rows_triton.weighted_row_sum(rows, cols, weights, **kernel_args)
    # Zero weights read row 0 instead of an index that may be out of range.
    safe = torch.where(weights != 0, cols, torch.zeros_like(cols))
    return torch.nn.functional.embedding_bag(safe, rows.to(torch.float32), per_sample_weights=weights,
                                             mode="sum")
