"""The Triton kernel of invprop/kernels/weighted_rows.py: one program per (query, block of columns of D) walks
the query's listed rows in blocks, loads only those of non-zero weight and accumulates in float32 registers.
Deterministic (no atomics). Compiled on CUDA tensors; on CPU tensors it runs in Triton's interpreter (tests).
Importing this module needs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from invprop.kernels.triton_jit import block_d_for, jit_for


def _weighted_rows_kernel(rows_ptr, cols_ptr, w_ptr, out_ptr, C, stride_rows, stride_cols, stride_w, stride_out,
                          D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    q = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = ds < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(w_ptr + q.to(tl.int64) * stride_w + cs, mask=cs < C, other=0.0)
        used = w != 0
        col = tl.load(cols_ptr + q.to(tl.int64) * stride_cols + cs, mask=used, other=0)
        v = tl.load(rows_ptr + col[:, None].to(tl.int64) * stride_rows + ds[None, :],
                    mask=used[:, None] & d_in[None, :], other=0.0)
        acc += tl.sum(v.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + q.to(tl.int64) * stride_out + ds, acc, mask=d_in)


def weighted_row_sum(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, block_c: int = 64,
                     block_d: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Q x D float32: sum_c weights[q, c] * rows[cols[q, c]] (weights float32, contiguous)."""
    q, c = cols.shape
    dim = rows.shape[1]
    out = torch.zeros(q, dim, dtype=torch.float32, device=rows.device)
    if q == 0 or c == 0:
        return out
    rows, cols = rows.contiguous(), cols.contiguous()
    block_d = block_d or block_d_for(dim)
    grid = (q, triton.cdiv(dim, block_d))
    extra = {"num_warps": num_warps} if rows.device.type == "cuda" else {}
    jit_for(_weighted_rows_kernel, rows.device)[grid](
        rows, cols, weights, out, c, rows.stride(0), cols.stride(0), weights.stride(0), out.stride(0),
        D=dim, BLOCK_C=block_c, BLOCK_D=block_d, **extra)
    return out
