"""Exact local top-M of a batch of queries against bank rows, without the Q x N float32 score matrix.

1. A per-query threshold t, a little below the M-th largest score: from a strided row sample (or given).
2. Low-precision scores (float16 or bfloat16 inputs, float32 accumulation) of every row; each entry at or above
   t - delta_q (delta_q: a proven bound on |low-precision score - float32 score| for query q) goes to a
   compact per-query buffer of fixed capacity. On CUDA this is one fused Triton kernel (scores stay on chip).
3. float32 rescoring of the buffered rows and a top-M over them.
4. Certificate: if at least M buffered rows score >= t in float32, then the float32 M-th largest E_M >= t, so
   every row of the float32 top-M (score >= E_M, hence low-precision score >= E_M - delta_q >= t - delta_q)
   was buffered, and the top-M of the buffer is the exact top-M. A query that fails it (too few rows reached
   the threshold, or its buffer overflowed) is redone with a plain float32 top-k; `TopM.redone` counts them.

`topm(..., backend="torch")` is the same contract in plain torch (the CPU's route, and the reference of the
Triton kernels in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Unit roundoff of the low-precision inputs.
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# The threshold: the r-th largest of a strided sample, r this many sampled hits above the expected number
# of sampled scores above the M-th largest (a few standard deviations): few queries fall short of M.
SAMPLE_HITS = 192
SAMPLE_SIGMAS = 5.0
# Buffer capacity over the expected number of buffered rows.
CAPACITY_FACTOR = 1.5
# Scores per chunk of the exact fallback and of the torch candidate scan.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TopM:
    vals: torch.Tensor  # Q x M float32 scores, descending
    ids: torch.Tensor  # Q x M int64 row index + id0
    redone: int  # queries redone with the exact float32 top-k (certificate failed or buffer overflowed)
    overflowed: int  # of those, queries whose buffer overflowed
    capacity: int  # buffer slots per query


def available() -> bool:
    """Whether Triton is importable (it ships with PyTorch's CUDA wheels)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def error_bound(zq: torch.Tensor, max_norm: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Per query, a bound on |low-precision score - float32 score| over rows of norm <= max_norm.

    Rounding both inputs to `dtype` moves a product by at most 2u|z||V| (Cauchy-Schwarz), a low-precision
    output by u|z||V| more (the torch route on CUDA may round its output); float32 accumulation of D terms in
    either evaluation adds D 2^-24 |z||V| each (3 D allows for tensor cores that truncate instead of round);
    subnormals stay far inside the absolute 2^-20 term. Generous: a looser bound only buffers a few more rows.
    """
    d = zq.shape[1]
    zn = zq.float().norm(dim=1)
    scale = zn * max_norm
    return ((3.0 * UNIT[dtype] + 3.0 * d * 2.0**-24) * 1.01 * scale
            + 2.0**-20 * (1.0 + d**0.5 * (zn + max_norm)))


def float32_slack(zq: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """Per query, a bound on the difference of two float32 evaluations of a score (different summation
    orders): the sample's threshold is lowered by it, so an evaluation of the rows that happens to round the
    M-th score down still clears it."""
    d = zq.shape[1]
    return 2.0 * d * 2.0**-24 * 1.01 * zq.float().norm(dim=1) * max_norm + 2.0**-30


def sample_threshold(zq: torch.Tensor, rows: torch.Tensor, m: int, hits: int = SAMPLE_HITS,
                     sigmas: float = SAMPLE_SIGMAS) -> tuple[torch.Tensor, float]:
    """Per query, a float32 value at (or, w.h.p., a little below) the M-th largest score, and the expected
    number of rows at or above it. A sample of `stride`-spaced rows; where the stride is 1 (M >= hits), the
    M-th largest itself."""
    n = rows.shape[0]
    stride = max(1, m // hits)  # a sample of ~hits * N / M rows
    sample = rows[::stride]
    s = sample.shape[0]
    if stride == 1:
        r = m
    else:
        mean = m * s / n
        r = max(1, min(s, math.ceil(mean + sigmas * math.sqrt(mean)) + 1))
    scores = zq.float() @ sample.float().t()
    t = scores.topk(r, dim=1, sorted=False).values.amin(1)
    return t, (r + 3.0 * math.sqrt(r)) * n / s


def default_capacity(n: int, m: int, expected: float) -> int:
    """Buffer slots per query: the expected count with room to spare, at least 2M (rows within the error bound
    of the threshold come on top), at most the whole shard (then it cannot overflow)."""
    return int(min(n, max(2 * m, math.ceil(CAPACITY_FACTOR * expected)), max(n, 1)))


def topm(zq: torch.Tensor, rows: torch.Tensor, m: int, *, low: torch.Tensor | None = None,
         max_norm: torch.Tensor | None = None, threshold: torch.Tensor | None = None, capacity: int = 0,
         id0: int = 0, backend: str = "triton", hits: int = SAMPLE_HITS, **kernel_args: int) -> TopM:
    """The exact float32 top-min(m, N) (values descending, ids id0 + row) of every query in zq (Q x D) against
    rows (N x D, float32), as float64 scoring would pick them up to float32 rounding and ties at the M-th.

    `low`: the rows in float16/bfloat16 (made here if not given; a bank keeps it current), `max_norm`: the
    largest row norm (likewise), `threshold`: the per-query t of step 1 (default: sampled), `capacity`: buffer
    slots per query (default: from the sample), `backend`: "triton" (the fused kernels; CPU tensors run in
    Triton's interpreter) or "torch".
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be triton or torch, got {backend!r}")
    q, n = zq.shape[0], rows.shape[0]
    m = min(m, n)
    zq = zq.float()
    if m == 0 or q == 0:
        empty = torch.empty(q, m, device=zq.device)
        return TopM(empty, empty.long(), 0, 0, 0)
    if low is None:
        low = rows.to(torch.float16)
    if max_norm is None:
        max_norm = rows.norm(dim=1).max() if n else rows.new_zeros(())
    expected = float(n)
    if threshold is None:
        threshold, expected = sample_threshold(zq, rows, m, hits)
    threshold = threshold.float() - float32_slack(zq, max_norm)
    cap = capacity or default_capacity(n, m, expected)
    lower = threshold - error_bound(zq, max_norm, low.dtype)
    zq_low = zq.to(low.dtype)
    if backend == "triton":
        from invprop.kernels import topm_triton

        cand, count = topm_triton.candidates(zq_low, low, lower, cap, **kernel_args)
        scores = topm_triton.rescore(zq, rows, cand, count)
    else:
        cand, count = candidates_torch(zq_low, low, lower, cap)
        scores = rescore_torch(zq, rows, cand, count)
    take = min(m, cap)
    vals, slot = scores.topk(take, dim=1)
    ids = cand.gather(1, slot).long()
    overflow = count > cap
    ok = ~overflow & (count >= m) & (vals[:, -1] >= threshold)
    redo = (~ok).nonzero().squeeze(1)  # the one read back: which queries need the exact route
    if take < m:  # a capacity below M: no query can pass
        vals = torch.nn.functional.pad(vals, (0, m - take), value=float("-inf"))
        ids = torch.nn.functional.pad(ids, (0, m - take), value=-1)
    if redo.numel():
        exact_vals, exact_ids = exact_topk(zq[redo], rows, m)
        vals[redo], ids[redo] = exact_vals, exact_ids
    overflowed = int(overflow[redo].sum()) if redo.numel() else 0
    return TopM(vals, ids + id0, redo.numel(), overflowed, cap)


def exact_topk(zq: torch.Tensor, rows: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 top-m (values descending, row indices) of every query, rows scored in chunks."""
    n = rows.shape[0]
    chunk = max(m, _CHUNK_ELEMENTS // max(1, zq.shape[0]))
    best_vals = zq.new_empty(zq.shape[0], 0)
    best_ids = torch.empty(zq.shape[0], 0, dtype=torch.int64, device=zq.device)
    for c0 in range(0, n, chunk):
        vals, cols = (zq @ rows[c0 : c0 + chunk].t()).topk(min(m, rows[c0 : c0 + chunk].shape[0]), dim=1)
        vals, ids = torch.cat([best_vals, vals], dim=1), torch.cat([best_ids, cols + c0], dim=1)
        best_vals, slot = vals.topk(min(m, vals.shape[1]), dim=1)
        best_ids = ids.gather(1, slot)
    return best_vals, best_ids


def candidates_torch(zq_low: torch.Tensor, rows_low: torch.Tensor, lower: torch.Tensor, cap: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`topm_triton.candidates` in torch: float32 products of the low-precision inputs (as the kernel's float32
    accumulation), each hit at the next free slot of its query's buffer, in row order."""
    q, n = zq_low.shape[0], rows_low.shape[0]
    cand = torch.full((q, cap), -1, dtype=torch.int32, device=zq_low.device)
    count = torch.zeros(q, dtype=torch.int64, device=zq_low.device)
    z = zq_low.float()
    chunk = max(1, _CHUNK_ELEMENTS // max(1, q))
    for c0 in range(0, n, chunk):
        hit = (z @ rows_low[c0 : c0 + chunk].float().t()) >= lower.unsqueeze(1)
        slot = count.unsqueeze(1) + hit.cumsum(1) - 1
        keep = hit & (slot < cap)
        query, col = keep.nonzero(as_tuple=True)
        cand[query, slot[query, col]] = (col + c0).to(torch.int32)
        count += hit.sum(1)
    return cand, count.to(torch.int32)


def rescore_torch(zq: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, count: torch.Tensor,
                  block_bytes: int = 256 << 20) -> torch.Tensor:
    """`topm_triton.rescore` in torch: gathered rows times the query (bmm), a block of queries at a time."""
    q, cap = cand.shape
    out = torch.full((q, cap), float("-inf"), dtype=torch.float32, device=zq.device)
    valid = torch.arange(cap, device=zq.device).unsqueeze(0) < count.clamp(max=cap).unsqueeze(1)
    per_query = max(1, cap * rows.shape[1] * 4)
    step = max(1, block_bytes // per_query)
    for q0 in range(0, q, step):
        block = slice(q0, q0 + step)
        idx = cand[block].clamp(min=0).long()
        picked = rows.index_select(0, idx.reshape(-1)).view(*idx.shape, rows.shape[1]).float()
        dots = torch.bmm(picked, zq[block].unsqueeze(2)).squeeze(2)
        out[block] = torch.where(valid[block], dots, out[block])
    return out
