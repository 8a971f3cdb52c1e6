"""`filter`: float16 scores pick m + extra candidates, rescored in float32; a proven error bound says per query
whether the float32 top-m is among them, and the few queries where it may not be are redone with `topk`."""

from __future__ import annotations

import torch

from invprop.bank.select.base import Selected, Selection, local_dots, replace_rows
from invprop.bank.select.mirror import DTYPE, HalfMirror
from invprop.bank.select.topk import TopK

UNIT = 2.0**-11  # float16 unit roundoff


def error_bound(zq: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """Per query, a bound on |float16 score - float32 score| for every row of norm <= max_norm.

    float16 GEMM, float32 accumulation (products of float16 values are exact in float32), float16 output: input
    rounding 2u|z||V| (Cauchy-Schwarz), output rounding u|z||V|, u = 2^-11; float32 accumulation of D terms in
    either evaluation, D 2^-24 |z||V| each; subnormal inputs and outputs (absolute 2^-25 each) far inside the
    2^-20 term. Rounded up generously: a looser delta only costs a few more candidates.
    """
    d = zq.shape[1]
    zn = zq.norm(dim=1)
    scale = zn * max_norm
    return (3.0 * UNIT + 3.0 * d * 2.0**-24) * 1.01 * scale + 2.0**-20 * (1.0 + d**0.5 * (zn + max_norm))


class full_precision_half_gemm:
    """cuBLAS may reduce float16 GEMMs in float16 (split-K), or accumulate in float16 where allowed, unless told
    not to; the filter's error bound assumes float32 accumulation."""

    _FLAGS = ("allow_fp16_reduced_precision_reduction", "allow_fp16_accumulation")

    def __enter__(self) -> None:
        matmul = torch.backends.cuda.matmul
        self.before = {f: getattr(matmul, f) for f in self._FLAGS if hasattr(matmul, f)}
        for flag in self.before:
            setattr(matmul, flag, False)

    def __exit__(self, *exc: object) -> None:
        for flag, value in self.before.items():
            setattr(torch.backends.cuda.matmul, flag, value)


class HalfFilter(HalfMirror, Selection):
    """The float16 filter. Its margin `extra` (candidates beyond m; 0 until first used, then max(256, m / 4))
    doubles after a call that had to redo queries, up to `max_extra` times its start, and halves again after
    `clean_calls` calls without a redo: scores crowd near the m-th largest when the bank is young (rows from the
    untrained network) and spread out as training goes on. Failing at the widest margin for more than a quarter
    of the queries sets `retune_requested`."""

    name = "filter"

    def __init__(self, topk: TopK, *, max_extra: int = 8, clean_calls: int = 100) -> None:
        self.topk, self.max_extra, self.clean_calls = topk, max_extra, clean_calls
        self.extra = 0
        self.retune_requested = False
        self._clean_calls = 0
        self.forget_rows()

    def select(self, zq: torch.Tensor, rows: torch.Tensor, start: int, m: int) -> Selected:
        return (*self.filtered(zq, rows, start, m), False)

    def filtered(self, zq: torch.Tensor, rows: torch.Tensor, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A superset of the local top-k (float32 values, global ids) from float16 scores.

        Every float16 score a_j is within delta of any float32 evaluation e_j of the same product (`error_bound`).
        If the smallest kept a_j lies more than 2 delta below the k-th largest kept a_j, every j with
        e_j >= (the k-th largest e) was kept: such a j has a_j >= e_k - delta >= a_k - 2 delta. Queries failing
        that test are redone with float32 top-k.
        """
        n_local = rows.shape[0]
        first = max(256, k // 4)
        extra = self.extra or first
        if k + extra >= n_local:  # nothing left to filter out
            return self.topk.exact(zq, rows, start, k)
        half, max_norm = self.half_rows(rows)
        with full_precision_half_gemm():
            approx, ids = self.topk.chunked(zq.to(DTYPE), half, start, k + extra,
                                            self.topk.chunk_for(zq, k + extra, n_local, 2))
        approx = approx.float()
        kth = approx.topk(k, dim=1, sorted=False).values.amin(1)
        unsafe = approx.amin(1) >= kth - 2.0 * error_bound(zq, max_norm)
        vals = self.rescore(zq, rows, start, ids)
        redo = unsafe.nonzero().squeeze(1)
        self._clean_calls = 0 if redo.numel() else self._clean_calls + 1
        if redo.numel():
            exact_vals, exact_ids = self.topk.exact(zq[redo], rows, start, k)
            vals, ids = replace_rows(vals, ids, redo, exact_vals, exact_ids)
            if extra < self.max_extra * first:
                extra *= 2
            elif redo.numel() > zq.shape[0] // 4:  # even the widest margin fails: ask `auto` to measure again
                self.retune_requested = True
        elif self._clean_calls >= self.clean_calls and extra > first:
            extra, self._clean_calls = extra // 2, 0
        self.extra = extra
        return vals, ids

    @staticmethod
    def rescore(zq: torch.Tensor, rows: torch.Tensor, start: int, ids: torch.Tensor,
                block_bytes: int = 256 << 20) -> torch.Tensor:
        """float32 z_q . V_ids[q, c] for this shard's ids, a block of queries at a time (the gathered rows of
        every query at once would be Q x C x D floats)."""
        per_query = max(1, ids.shape[1] * rows.shape[1] * rows.element_size())
        queries_per_block = max(1, block_bytes // per_query)
        out = torch.empty(ids.shape, dtype=rows.dtype, device=ids.device)
        for q0 in range(0, ids.shape[0], queries_per_block):
            block = slice(q0, q0 + queries_per_block)
            out[block] = local_dots(rows, zq[block], ids[block] - start)
        return out
