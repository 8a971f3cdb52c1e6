"""The two Triton kernels of the fused exact top-M (invprop/kernels/topm.py holds the contract and the torch
equivalent): `candidates`, low-precision tiled scores whose entries at or above a per-query threshold go to a
compact buffer (the Q x N score matrix never reaches memory), and `rescore`, float32 scores of those entries.

On CUDA tensors they are compiled; on CPU tensors they run in Triton's interpreter (numpy, slow: tests only),
which Triton only offers when TRITON_INTERPRET=1 was set before it was first imported.
Importing this module needs Triton; `available()` in topm.py says whether it is there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from invprop.kernels.triton_jit import block_d_for, jit_for


def _candidates_kernel(z_ptr, v_ptr, lower_ptr, cand_ptr, count_ptr, Q, N, cap, stride_z, stride_v,
                       D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (query block, row tile): scores on tensor cores (float32 accumulation), then each query's hits in
    this tile claim consecutive slots of its buffer with one atomic add (their count) and a prefix sum; slots
    past `cap` are not written, but the count goes on, so the caller sees the overflow."""
    pid_n = tl.program_id(0)
    pid_q = tl.program_id(1)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_in = qs < Q
    n_in = ns < N
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_in = ds < D
        z = tl.load(z_ptr + qs[:, None] * stride_z + ds[None, :], mask=q_in[:, None] & d_in[None, :], other=0.0)
        v = tl.load(v_ptr + ns[:, None].to(tl.int64) * stride_v + ds[None, :], mask=n_in[:, None] & d_in[None, :],
                    other=0.0)
        acc = tl.dot(z, tl.trans(v), acc)
    lower = tl.load(lower_ptr + qs, mask=q_in, other=float("inf"))
    hit = (acc >= lower[:, None]) & n_in[None, :] & q_in[:, None]
    hits = hit.to(tl.int32)
    per_query = tl.sum(hits, axis=1)
    base = tl.atomic_add(count_ptr + qs, per_query, mask=q_in & (per_query > 0))
    slot = base[:, None] + tl.cumsum(hits, axis=1) - 1
    tl.store(cand_ptr + qs[:, None].to(tl.int64) * cap + slot, ns[None, :], mask=hit & (slot < cap))


def _rescore_kernel(z_ptr, v_ptr, cand_ptr, count_ptr, out_ptr, cap, stride_z, stride_v,
                    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """float32 z_q . V_j for a block of query q's buffered rows j (rows read once each, no gathered copy);
    -inf in the slots past the query's count."""
    q = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    count = tl.minimum(tl.load(count_ptr + q), cap)
    valid = cs < count
    rows = tl.load(cand_ptr + q.to(tl.int64) * cap + cs, mask=valid, other=0)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_in = ds < D
        z = tl.load(z_ptr + q * stride_z + ds, mask=d_in, other=0.0)
        v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_v + ds[None, :], mask=valid[:, None] & d_in[None, :],
                    other=0.0)
        acc += tl.sum(v * z[None, :], axis=1)
    tl.store(out_ptr + q.to(tl.int64) * cap + cs, tl.where(valid, acc, float("-inf")), mask=cs < cap)


def candidates(zq_low: torch.Tensor, rows_low: torch.Tensor, lower: torch.Tensor, cap: int, block_q: int = 64,
               block_n: int = 128, num_warps: int = 4, num_stages: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q x cap int32 row indices, in no particular order; Q int32 counts, which may exceed cap) of every
    low-precision score zq_low . rows_low[j] >= lower[q]."""
    q, dim = zq_low.shape
    n = rows_low.shape[0]
    cand = torch.full((q, cap), -1, dtype=torch.int32, device=zq_low.device)
    count = torch.zeros(q, dtype=torch.int32, device=zq_low.device)
    if q == 0 or n == 0:
        return cand, count
    zq_low, rows_low = zq_low.contiguous(), rows_low.contiguous()
    lower = lower.to(torch.float32).contiguous()
    grid = (triton.cdiv(n, block_n), triton.cdiv(q, block_q))
    extra = {} if zq_low.device.type != "cuda" else {"num_warps": num_warps, "num_stages": num_stages}
    jit_for(_candidates_kernel, zq_low.device)[grid](
        zq_low, rows_low, lower, cand, count, q, n, cap, zq_low.stride(0), rows_low.stride(0),
        D=dim, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d_for(dim), **extra)
    return cand, count


def rescore(zq: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, count: torch.Tensor,
            block_c: int = 64) -> torch.Tensor:
    """Q x cap float32 scores of the buffered rows (-inf past each count)."""
    q, cap = cand.shape
    out = torch.empty(q, cap, dtype=torch.float32, device=zq.device)
    if q == 0 or cap == 0:
        return out
    zq, rows = zq.float().contiguous(), rows.contiguous()
    grid = (q, triton.cdiv(cap, block_c))
    jit_for(_rescore_kernel, zq.device)[grid](zq, rows, cand, count, out, cap, zq.stride(0), rows.stride(0),
                                              D=zq.shape[1], BLOCK_C=block_c, BLOCK_D=block_d_for(zq.shape[1]))
    return out
