"""The memory bank V (N x D), split into contiguous row shards, one per rank.

Rank r owns rows [start, stop). The loss never indexes a global tensor: it asks the bank for
scores against the local shard and for exact global reductions over those scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from invprop import collectives as coll
from invprop.config import BANK_SELECTIONS

# Rows are initialised in fixed chunks, each from its own seed, so the bank is the same for any world size.
_INIT_CHUNK = 65536

# global_top: the sampled bound is only worth it when the shard is this many times larger than M (below, most
# scores would pass it, and a top-M selection over the whole shard is cheaper than compacting them).
_MIN_SHARD_OVER_M = 8
# Block of consecutive scores whose maximum is tested first where scores above the bound are sparse.
_BLOCK = 32
# Expected number of sampled scores above the local M-th largest, and how many standard deviations the bound
# sits below it: ~1e-6 of queries per step need the exact fallback, and the kept set is ~(1 + 5/sqrt(192))M.
_SAMPLE_HITS = 192
_SAMPLE_SIGMAS = 5.0


# Accelerators: scores per chunk of the top-k route (1 GiB of float32).
_TOPK_CHUNK_ELEMENTS = 1 << 28

# How the local top-M is found (`bank.selection`), all exact:
#   topk   - float32 scores in column chunks, radix top-k per chunk merged into a running top-k;
#   bound  - a sampled lower bound of the M-th largest, then only the scores above it are kept (compaction);
#   filter - float16 scores (half the bytes, half the radix passes) pick M + extra candidates, which are
#            rescored in float32; a proven error bound says per query whether the float32 top-M is among them,
#            and the few queries where it may not be are redone with `topk`;
#   auto   - the CPU uses `bound` (fastest there, measured by tools/bench_bank.py); an accelerator times
#            topk, bound and filter on its first step and keeps the fastest.
SELECTIONS = BANK_SELECTIONS
_TUNED = ("topk", "bound", "filter")
_FILTER_DTYPE = torch.float16
_FILTER_UNIT = 2.0**-11  # float16 unit roundoff
_FILTER_MAX_EXTRA = 8  # the filter's margin grows to at most this many times its start, max(256, M / 4)
_FILTER_CLEAN_CALLS = 100  # calls without a redo before the margin halves again
_RETUNE_AFTER_CALLS = 200  # `auto` measures again at most this often, and only when `filter` asked for it
TUNE_ON_CPU = False  # tests switch it on to exercise the accelerators' `auto` on the CPU


def _chunk_elements(device: torch.device) -> int:
    """Scores per chunk of the shard scan and of the sampled bound (both CPU-only in global_top): cache-sized on
    CPU, large elsewhere (fewer launches)."""
    return 1 << 20 if device.type == "cpu" else 1 << 26


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous shard of rank `rank`; the last rank takes the remainder."""
    base = n // world
    start = rank * base
    stop = n if rank == world - 1 else start + base
    return start, stop


def init_rows(start: int, stop: int, dim: int, seed: int) -> torch.Tensor:
    """Uniform(-a, a) with a = 1/sqrt(D/3), not normalised (DESIGN section 2.8)."""
    bound = 1.0 / math.sqrt(dim / 3.0)
    out = torch.empty(stop - start, dim)
    for chunk in range(start // _INIT_CHUNK, (stop - 1) // _INIT_CHUNK + 1 if stop > start else 0):
        c0 = chunk * _INIT_CHUNK
        gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        block = torch.rand(_INIT_CHUNK, dim, generator=gen) * (2 * bound) - bound
        lo, hi = max(start, c0), min(stop, c0 + _INIT_CHUNK)
        out[lo - start : hi - start] = block[lo - c0 : hi - c0]
    return out


def _float_to_ordered(x: torch.Tensor) -> torch.Tensor:
    """Map float32 to int64 keys in [0, 2^32) with the same order (for an exact radix select)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    signed = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return signed + (1 << 31)


def _ordered_to_float(key: torch.Tensor) -> torch.Tensor:
    signed = key - (1 << 31)
    bits = torch.where(signed >= 0, signed, signed ^ 0x7FFFFFFF)
    return bits.to(torch.int32).view(torch.float32)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int = -1, tau: float = 1.0) -> torch.Tensor:
    """logsumexp of x / tau over the entries where mask is true; -inf (with a zero gradient) where none is.

    One fused autograd node: a handful of passes over x instead of the ~10 of masked_fill + exp + sum and
    their backward, which matters for the (Q x ~M) top-M scores.
    """
    return _MaskedLogSumExp.apply(x, mask, dim, tau)


class _MaskedLogSumExp(torch.autograd.Function):
    # Branch-free masking: torch.where / masked_fill on a random boolean pattern are ~10x slower than plain
    # vectorised passes, and exp() of arguments that underflow (-inf, or below about -87 in float32) takes a
    # slow path. So the peak is taken with -2^126 added to dropped entries, exp() sees arguments clamped to
    # [-80, 0], and the mask (0/1) multiplies the result. The clamp only changes kept terms below e^-80 of the
    # peak term, which are below float32 resolution of the sum.
    _DROP = float(2.0**126)
    _FLOOR = -80.0

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, dim: int, tau: float):  # type: ignore[override]
        keep = (mask & (x > float("-inf"))).to(x.dtype)  # kept -inf terms are 0, also after the clamp below
        logits = torch.div(x, tau) if tau != 1.0 else x
        peak = torch.add(logits, keep - 1.0, alpha=_MaskedLogSumExp._DROP).amax(dim=dim, keepdim=True)
        peak = torch.where(peak > -0.5 * _MaskedLogSumExp._DROP, peak, torch.zeros_like(peak))  # none kept
        e = torch.sub(logits, peak).clamp_(_MaskedLogSumExp._FLOOR, 0.0).exp_().mul_(keep)
        total = e.sum(dim=dim, keepdim=True)
        ctx.save_for_backward(e, total)
        ctx.dim, ctx.tau = dim, tau
        return (_safe_log(total) + peak).squeeze(dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        e, total = ctx.saved_tensors
        # d/dx = softmax over the kept entries / tau; rows with nothing kept get 0, not 0/0.
        coef = torch.where(total > 0, grad.unsqueeze(ctx.dim) / (total * ctx.tau), torch.zeros_like(total))
        return e * coef, None, None, None


def _safe_log(total: torch.Tensor) -> torch.Tensor:
    # log(0) must give -inf without putting NaN into the backward of unrelated rows.
    positive = total > 0
    out = torch.log(torch.where(positive, total, torch.ones_like(total)))
    return torch.where(positive, out, torch.full_like(out, float("-inf")))


def logsumexp_across_ranks(local: torch.Tensor) -> torch.Tensor:
    """Combine per-rank logsumexp values into the global one, differentiably."""
    if coll.rank_and_world()[1] == 1:
        return local
    peak = coll.max_across_ranks(local.detach())
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = coll.sum_across_ranks(torch.exp(local - peak))
    return _safe_log(total) + peak


@dataclass
class TopCandidates:
    """This rank's share of the global top-M, per query (Q x C, padded with score -inf and id -1).

    Holds every local score at or above a per-query lower bound of the local M-th largest, so a superset of
    the local top-M; `in_top` marks those in the exact global top-M (score >= `threshold`, the global M-th
    largest). Global ids ascend along each row where `ascending`.
    """

    vals: torch.Tensor  # scores, differentiable in the queries
    ids: torch.Tensor
    in_top: torch.Tensor
    threshold: torch.Tensor  # (Q,)
    ascending: bool = True


class _SelectedScores(torch.autograd.Function):
    """Scores z_q . V_j already computed (without grad) for a few bank rows j per query (global ids, -1 for
    padding; `start` is this shard's first id); the backward is sum_j g_qj V_j, a weighted gather of rows,
    instead of a dense (Q x n_local) matmul."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,  # type: ignore[override]
                vals: torch.Tensor, start: int) -> torch.Tensor:
        ctx.save_for_backward(rows, ids)  # saving `rows` makes an in-place bank update before backward fail
        ctx.z_dtype, ctx.start = z.dtype, start
        return vals.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rows, ids = ctx.saved_tensors
        weights = grad.to(rows.dtype).contiguous()
        # Zero weights (padding, scores outside every mask) read row 0 instead of a random row.
        cols = (ids - ctx.start) * (weights != 0)
        out = torch.nn.functional.embedding_bag(cols, rows, per_sample_weights=weights, mode="sum")
        return out.to(ctx.z_dtype), None, None, None, None


# On CPU the scan's compare-and-compact runs as one numba loop (numba is a dependency already, for the FFCV
# loader): a single pass over the scores that writes only the hits, ~4x cheaper than the torch ops below
# (compare, nonzero, gathers, index arithmetic). Tests switch it off to cover the torch path too.
USE_NUMBA = True
_COLLECT: object = None  # the compiled kernel; False where numba is unavailable


def _collect_hits(s, lower, out_vals, out_ids, fill, id0):  # pragma: no cover - runs compiled
    """Append each s[r, c] >= lower[r] to row r of out_vals / out_ids (id0 + c) at position fill[r]; fill[r]
    counts on past the width of the outputs, which then have to be widened and the chunk collected again."""
    q, b = s.shape
    width = out_vals.shape[1]
    for r in range(q):
        t = lower[r]
        k = fill[r]
        for c in range(b):
            v = s[r, c]
            if v >= t:
                if k < width:
                    out_vals[r, k] = v
                    out_ids[r, k] = id0 + c
                k += 1
        fill[r] = k


def _collect_kernel():
    global _COLLECT
    if _COLLECT is None:
        try:
            import numba
        except ImportError:  # pragma: no cover
            _COLLECT = False
        else:
            _COLLECT = numba.njit(nogil=True, cache=True)(_collect_hits)
    return _COLLECT or None


def _hits(s: torch.Tensor, lower: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major flat positions, and values, of the entries of s (q x b) that are >= lower (q x 1).

    With block > 1 (dividing b) the per-block maxima are tested first and only blocks that reach the bound are
    looked into: the same result, much cheaper when hits are sparse (one block max pass instead of a compare
    and a nonzero over every score).
    """
    q, b = s.shape
    if block <= 1:
        flat = (s >= lower).view(-1).nonzero().squeeze(1)
        return flat, s.view(-1).index_select(0, flat)
    nb = b // block
    hot = (s.view(q, nb, block).amax(2) >= lower).view(-1).nonzero().squeeze(1)  # blocks holding a hit
    cand = s.view(q * nb, block).index_select(0, hot)
    lim = lower.view(-1).index_select(0, torch.div(hot, nb, rounding_mode="floor")).unsqueeze(1)
    pos = (cand >= lim).view(-1).nonzero().squeeze(1)
    blk = torch.div(pos, block, rounding_mode="floor")
    flat = hot.index_select(0, blk) * block + (pos - blk * block)
    return flat, cand.view(-1).index_select(0, pos)


def _replace_rows(vals: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, new_vals: torch.Tensor,
                  new_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vals/cols with the given rows replaced, both padded to a common width."""
    width = max(vals.shape[1], new_vals.shape[1])

    def widen(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    vals, cols = widen(vals, float("-inf")), widen(cols, -1)
    vals[rows], cols[rows] = widen(new_vals, float("-inf")), widen(new_cols, -1)
    return vals, cols


def _filter_delta(zq: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """Per query, a bound on |float16 score - float32 score| for every row of norm <= max_norm.

    float16 GEMM, float32 accumulation (products of float16 values are exact in float32), float16 output: input
    rounding 2u|z||V| (Cauchy-Schwarz), output rounding u|z||V|, u = 2^-11; float32 accumulation of D terms in
    either evaluation, D 2^-24 |z||V| each; subnormal inputs and outputs (absolute 2^-25 each) far inside the
    2^-20 term. Rounded up generously: a looser delta only costs a few more candidates.
    """
    d = zq.shape[1]
    zn = zq.norm(dim=1)
    scale = zn * max_norm
    return (3.0 * _FILTER_UNIT + 3.0 * d * 2.0**-24) * 1.01 * scale + 2.0**-20 * (1.0 + d**0.5 * (zn + max_norm))


class _float32_matmul:
    """float32 GEMMs as float32 (no TF32) whatever the caller enabled: the selection is exact in float32."""

    def __enter__(self) -> None:
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.before


class _full_precision_half_gemm:
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


class ShardedBank:
    """This rank's rows of the bank plus the collectives that make shard-local work globally exact."""

    def __init__(self, n: int, dim: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu", selection: str = "auto") -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"bank.selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.n, self.dim, self.rank, self.world = n, dim, rank, world
        self.start, self.stop = shard_bounds(n, rank, world)
        self.rows = init_rows(self.start, self.stop, dim, seed).to(device)  # also resets the float16 mirror
        self.selection = selection
        self.tuned: str | None = None  # what `auto` chose on this accelerator
        self.tuning_ms: dict[str, float] = {}  # what it measured
        self.filter_extra = 0  # candidates beyond M for `filter` (0: not set yet); doubles where too few
        self.retune_requested = False  # `filter` failing even at its widest margin
        self._calls = self._tuned_at = self._filter_clean_calls = 0

    @property
    def rows(self) -> torch.Tensor:
        """This rank's rows (n_local x D, float32)."""
        return self._rows

    @rows.setter
    def rows(self, value: torch.Tensor) -> None:
        self._rows = value
        # float16 mirror of the rows for `filter`, rebuilt on next use; _half_key: the rows' version it matches
        self._half: torch.Tensor | None = None
        self._half_key: int | None = None
        self._half_max_norm = torch.zeros(())

    @property
    def n_local(self) -> int:
        return self.stop - self.start

    def local_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Scores (Q x n_local) of every gathered query against this shard; differentiable in z."""
        return z @ self.rows.t()

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.start) & (ids < self.stop)

    def pair_scores(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Global scores z_q . V_ids[q, c] (ids < 0 give 0) from the owner shards, without a full score matrix;
        differentiable in z. Non-owners contribute exact zeros, so every rank receives bit-identical values."""
        own = self.owned(ids)
        picked = self._local_dots(z, torch.where(own, ids - self.start, torch.zeros_like(ids))) * own
        return coll.sum_across_ranks(picked)

    def _local_dots(self, z: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """z_q . rows[local[q, c]] (Q x C) for local row indices, by gathering only those rows."""
        rows = self.rows.index_select(0, local.reshape(-1)).view(*local.shape, self.dim)
        return torch.bmm(rows, z.unsqueeze(2)).squeeze(2)

    def kth_largest(self, top_vals: torch.Tensor, k: int) -> torch.Tensor:
        """Exact global k-th largest score per query, from any superset of each rank's local top-k values
        (in any order; -inf padding allowed as long as the ranks hold k real values between them).

        Radix select on order-preserving integer keys: 4 rounds of all-reduced 256-bin histograms.
        """
        if self.world == 1:
            if top_vals.shape[1] == k:
                return top_vals.detach().amin(1)
            return top_vals.detach().topk(k, dim=1, sorted=False).values.amin(1)
        keys = _float_to_ordered(top_vals.detach().float())
        q = keys.shape[0]
        need = torch.full((q,), k, dtype=torch.int64, device=keys.device)
        prefix = torch.zeros(q, dtype=torch.int64, device=keys.device)
        for shift in (24, 16, 8, 0):
            high = shift + 8
            match = (keys >> high) == (prefix >> high).unsqueeze(1)
            digit = (keys >> shift) & 255
            hist = torch.zeros(q, 256, dtype=torch.int64, device=keys.device)
            hist.scatter_add_(1, digit, match.to(torch.int64))
            hist = coll.sum_across_ranks(hist)
            at_or_above = hist.flip(1).cumsum(1).flip(1)
            chosen = (at_or_above >= need.unsqueeze(1)).sum(1) - 1
            above = torch.where(chosen < 255, at_or_above.gather(1, (chosen + 1).clamp(max=255).unsqueeze(1))
                                .squeeze(1), torch.zeros_like(chosen))
            need = need - above
            prefix = prefix | (chosen << shift)
        return _ordered_to_float(prefix)

    def global_top(self, z: torch.Tensor, m: int, keep: int = 0) -> TopCandidates:
        """This rank's part of the exact global top-m of every query in `z` (Q x D).

        The candidates always include the local top-max(m, keep) (so `nearest` can use them too); how they are
        found is `selection` (see SELECTIONS). With `bound` on a shard much larger than M, the shard is scored
        in column chunks and only the scores at or above a cheap per-query lower bound of the local
        max(m, keep)-th largest are kept; the full Q x n_local score matrix is never held. The bound comes from
        a strided sample of the shard; where it fails (fewer than max(m, keep) scores reach it) the query's
        exact local top-max(m, keep) is taken instead, so the result never depends on the sample. Ids then
        ascend along each row. Otherwise (a smaller shard, where most scores would pass any bound; `topk`; `filter`) the
        candidates hold the local top-max(m, keep), in no particular order.
        """
        m_sel = min(max(m, keep), self.n_local)
        # Selection in full precision whatever autocast region the caller is in: the result must be exact.
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False), _float32_matmul():
            zq = z.detach().to(self.rows.dtype)
            vals, ids, ascending = self._select(zq, m_sel, self.strategy(zq, m_sel))
            threshold = self.kth_largest(vals, m)
            in_top = vals >= threshold.unsqueeze(1)
        return TopCandidates(_SelectedScores.apply(z, self.rows, ids, vals, self.start), ids, in_top, threshold,
                             ascending)

    def strategy(self, zq: torch.Tensor, m_sel: int) -> str:
        """The selection this call uses: the configured one, or what `auto` picks for this device."""
        if self.selection != "auto":
            return self.selection
        if zq.device.type == "cpu" and not TUNE_ON_CPU:
            return "bound"
        self._calls += 1
        if self.retune_requested and self._calls - self._tuned_at >= _RETUNE_AFTER_CALLS:
            self.tuned = None  # the scores have changed since the last measurement: measure again
        if self.tuned is None:
            self.autotune(zq, m_sel)
            self._tuned_at, self.retune_requested = self._calls, False
        return self.tuned

    def autotune(self, zq: torch.Tensor, m_sel: int, repeats: int = 2) -> str:
        """Time each exact selection on these queries (one warm-up call, then the best of `repeats`) and keep
        the fastest. Local work only, no collective: ranks may choose differently and still agree on results."""
        def wait() -> None:
            if zq.device.type == "cuda":
                torch.cuda.synchronize(zq.device)

        for name in _TUNED:
            self._select(zq, m_sel, name)
            best = float("inf")
            for _ in range(repeats):
                wait()
                start = time.perf_counter()
                self._select(zq, m_sel, name)
                wait()
                best = min(best, time.perf_counter() - start)
            self.tuning_ms[name] = best * 1000
        self.tuned = min(self.tuning_ms, key=self.tuning_ms.__getitem__)
        if self.tuned != "filter":  # its float16 copy of the shard is not needed after all
            self._half = None
        return self.tuned

    def _select(self, zq: torch.Tensor, m_sel: int, strategy: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(values, global ids, ids ascending) holding this rank's local top-m_sel of every query."""
        if strategy == "bound":
            bound, expect = self._sample_bound(zq, m_sel)
            if bound is not None:
                vals, ids, count = self._scan(zq, bound, expect)
                short = (count < m_sel).nonzero().squeeze(1)
                if short.numel():  # the sampled bound overshot for these queries: their exact local top-m_sel
                    # Values and ids from one evaluation: a rescan with the exact bound would need two GEMMs of
                    # different shapes to agree to the last bit, which a GPU's GEMMs need not.
                    zs = zq[short]
                    exact_vals, exact_ids = self._exact_topk(zs, m_sel)
                    exact_ids, order = exact_ids.sort(dim=1)  # ids ascend along each row, as scanned rows' do
                    vals, ids = _replace_rows(vals, ids, short, exact_vals.gather(1, order), exact_ids)
                return vals, ids, True
        if strategy == "filter":
            return (*self._filtered_topk(zq, m_sel), False)
        return (*self._exact_topk(zq, m_sel), False)

    def _exact_topk(self, zq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The local float32 top-k (values, global ids; unordered) of every query in `zq`."""
        return self._chunked_topk(zq, k, self._topk_chunk(zq, k))

    def _topk_chunk(self, zq: torch.Tensor, k: int, bytes_per_score: int = 4) -> int:
        if zq.device.type == "cpu":
            return max(self.n_local, 1)
        return max(_TOPK_CHUNK_ELEMENTS * 4 // bytes_per_score // max(1, zq.shape[0]), 2 * k)

    def _chunked_topk(self, zq: torch.Tensor, k: int, chunk: int, rows: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local top-k (values, global ids; unordered) of every query against `rows` (default: the shard),
        `chunk` columns at a time."""
        rows = self.rows if rows is None else rows
        best_vals = best_ids = None
        for c0 in range(0, self.n_local, chunk):
            vals, cols = (zq @ rows[c0 : c0 + chunk].t()).topk(min(k, chunk, self.n_local - c0), dim=1,
                                                               sorted=False)
            ids = cols + (self.start + c0)
            if best_vals is not None:
                vals, ids = torch.cat([best_vals, vals], dim=1), torch.cat([best_ids, ids], dim=1)
                vals, slot = vals.topk(min(k, vals.shape[1]), dim=1, sorted=False)
                ids = ids.gather(1, slot)
            best_vals, best_ids = vals, ids
        return best_vals, best_ids

    def _filtered_topk(self, zq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`filter`: a superset of the local top-k (float32 values, global ids) from float16 scores.

        Every float16 score a_j is within delta of any float32 evaluation e_j of the same product (bound in
        `_filter_delta`). If the smallest kept a_j lies more than 2 delta below the k-th largest kept a_j, every
        j with e_j >= (the k-th largest e) was kept: such a j has a_j >= e_k - delta >= a_k - 2 delta. Queries
        failing that test are redone with float32 top-k. The margin (`filter_extra`) doubles after a failure up
        to a cap, and halves again after a long run without one: scores crowd near the M-th largest when the
        bank is young (rows from the untrained network) and spread out as training goes on.
        """
        start = max(256, k // 4)
        extra = self.filter_extra or start
        if k + extra >= self.n_local:  # nothing left to filter out
            return self._exact_topk(zq, k)
        half, max_norm = self._half_rows()
        with _full_precision_half_gemm():
            approx, ids = self._chunked_topk(zq.to(_FILTER_DTYPE), k + extra, self._topk_chunk(zq, k + extra, 2),
                                             half)
        approx = approx.float()
        kth = approx.topk(k, dim=1, sorted=False).values.amin(1)
        unsafe = approx.amin(1) >= kth - 2.0 * _filter_delta(zq, max_norm)
        vals = self._rescore(zq, ids)
        redo = unsafe.nonzero().squeeze(1)
        self._filter_clean_calls = 0 if redo.numel() else self._filter_clean_calls + 1
        if redo.numel():
            exact_vals, exact_ids = self._exact_topk(zq[redo], k)
            vals, ids = _replace_rows(vals, ids, redo, exact_vals, exact_ids)
            if extra < _FILTER_MAX_EXTRA * start:
                extra *= 2
            elif redo.numel() > zq.shape[0] // 4:  # even the widest margin fails: ask `auto` to measure again
                self.retune_requested = True
        elif self._filter_clean_calls >= _FILTER_CLEAN_CALLS and extra > start:
            extra, self._filter_clean_calls = extra // 2, 0
        self.filter_extra = extra
        return vals, ids

    def _rescore(self, zq: torch.Tensor, ids: torch.Tensor, block_bytes: int = 256 << 20) -> torch.Tensor:
        """float32 z_q . V_ids[q, c] for this shard's ids, a block of queries at a time (the gathered rows of
        every query at once would be Q x C x D floats)."""
        per_query = max(1, ids.shape[1] * self.dim * self.rows.element_size())
        queries_per_block = max(1, block_bytes // per_query)
        out = torch.empty(ids.shape, dtype=self.rows.dtype, device=ids.device)
        for q0 in range(0, ids.shape[0], queries_per_block):
            block = slice(q0, q0 + queries_per_block)
            out[block] = self._local_dots(zq[block], ids[block] - self.start)
        return out

    def _half_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float16 mirror of the rows and the largest row norm (a 0-d tensor); rebuilt when the rows were
        replaced (the setter drops it) or written in place anywhere but `update`, which keeps both current (the
        rows' version counter tells)."""
        if self._half is None or self._half_key != self.rows._version:
            self._half = self.rows.to(_FILTER_DTYPE)
            norms = self.rows.norm(dim=1)
            self._half_max_norm = norms.max() if norms.numel() else norms.new_zeros(())
            self._half_key = self.rows._version
        return self._half, self._half_max_norm

    def _sample_bound(self, zq: torch.Tensor, m_sel: int) -> tuple[torch.Tensor | None, int]:
        """Per query, a value that w.h.p. lies at or just below the m_sel-th largest local score (None: no bound
        worth having), and a generous guess of how many scores reach it.

        It is (at most) the r-th largest score of a strided column sample, r a few sigmas above the expected
        number of sampled scores above the m_sel-th largest. On a large sample the r-th largest of the maxima of
        blocks of _BLOCK sampled scores stands in for it: a lower bound of it (r blocks reach it, so r scores
        do), a little looser, and far cheaper to select than from every sampled score.
        """
        n = self.n_local
        if n < _MIN_SHARD_OVER_M * m_sel:
            return None, n
        stride = max(4, n // math.ceil(_SAMPLE_HITS * n / m_sel))  # at most a quarter of the shard
        sample = self.rows[::stride]
        s = sample.shape[0]
        mean = m_sel * s / n
        spread = math.sqrt(mean * (1.0 - m_sel / n) * max(0.0, (n - s) / max(1, n - 1)))
        r = max(1, min(s, math.ceil(mean + _SAMPLE_SIGMAS * spread) + 1))
        q, blocks = zq.shape[0], s // _BLOCK
        if blocks >= 4 * r:  # block maxima, the sample scored in chunks (never held whole)
            chunk = max(1, _chunk_elements(zq.device) // max(1, q) // _BLOCK) * _BLOCK
            scores = torch.empty(q, blocks, dtype=self.rows.dtype, device=zq.device)
            buffer = torch.empty(q * min(chunk, blocks * _BLOCK), dtype=self.rows.dtype, device=zq.device)
            for c0 in range(0, blocks * _BLOCK, chunk):
                part = sample[c0 : min(c0 + chunk, blocks * _BLOCK)]
                out = buffer[: q * part.shape[0]].view(q, part.shape[0])
                torch.matmul(zq, part.t(), out=out)
                scores[:, c0 // _BLOCK : c0 // _BLOCK + part.shape[0] // _BLOCK] = out.view(q, -1, _BLOCK).amax(2)
        else:
            scores = zq @ sample.t()
        bound = scores.topk(r, dim=1, sorted=False).values.amin(1)
        return bound, math.ceil((r + 3.0 * math.sqrt(r)) * n / s)

    def _scan(self, zq: torch.Tensor, bound: torch.Tensor, width: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every local score >= bound[q], per query in ascending column order, padded with (-inf, -1).

        Returns (values, global ids, count per query); `width` is a guess of the largest count. The shard is
        scored in column chunks, each into the same buffer.
        """
        q, n, dev = zq.shape[0], self.n_local, zq.device
        chunk = max(_BLOCK, _chunk_elements(dev) // max(1, q) // _BLOCK * _BLOCK)
        width = max(1, width)
        # Sparse hits (the usual case for n >> M): test per-block maxima first, then only the blocks that reach
        # the bound. Dense hits: test every score.
        blocked = width * _BLOCK < n // 4
        out_vals = torch.full((q, width), float("-inf"), dtype=self.rows.dtype, device=dev)
        out_cols = torch.full((q, width), -1, dtype=torch.int64, device=dev)
        fill = torch.zeros(q, dtype=torch.int64, device=dev)
        query = torch.arange(q, dtype=torch.int64, device=dev)
        lower = bound.unsqueeze(1).to(self.rows.dtype)
        buffer = torch.empty(q * min(chunk, n), dtype=self.rows.dtype, device=dev)
        kernel = _collect_kernel() if USE_NUMBA and dev.type == "cpu" else None
        if kernel is not None:
            lower_np = lower.view(-1).contiguous().numpy()
        for c0 in range(0, n, chunk):
            part = self.rows[c0 : c0 + chunk]
            b = part.shape[0]
            s = buffer[: q * b].view(q, b)
            torch.matmul(zq, part.t(), out=s)
            if kernel is not None:
                before = fill.clone()
                kernel(s.numpy(), lower_np, out_vals.numpy(), out_cols.numpy(), fill.numpy(), self.start + c0)
                need = int(fill.max())
                if need > width:  # more hits than guessed: widen the output and collect this chunk again
                    grow = max(need, 2 * width) - width
                    out_vals = torch.nn.functional.pad(out_vals, (0, grow), value=float("-inf"))
                    out_cols = torch.nn.functional.pad(out_cols, (0, grow), value=-1)
                    width += grow
                    fill.copy_(before)
                    kernel(s.numpy(), lower_np, out_vals.numpy(), out_cols.numpy(), fill.numpy(), self.start + c0)
                continue
            flat, vals = _hits(s, lower, _BLOCK if blocked and b % _BLOCK == 0 else 1)
            if flat.numel() == 0:
                continue
            first = torch.searchsorted(flat, query * b)  # where each query's hits start in `flat`
            count = torch.diff(first, append=first.new_full((1,), flat.numel()))
            new_fill = fill + count
            need = int(new_fill.max())
            if need > width:  # more hits than guessed: widen the output
                grow = max(need, 2 * width) - width
                out_vals = torch.nn.functional.pad(out_vals, (0, grow), value=float("-inf"))
                out_cols = torch.nn.functional.pad(out_cols, (0, grow), value=-1)
                width += grow
            # hit i, of query r, goes to out[r, fill[r] + i - first[r]]; its column is flat[i] - r * b + c0
            # output_size: the count is known here already, and without it each call waits for the device
            hits = flat.numel()
            at = (torch.repeat_interleave(query * width + fill - first, count, output_size=hits)
                  + torch.arange(hits, device=dev))
            out_vals.view(-1).index_copy_(0, at, vals)
            out_cols.view(-1).index_copy_(0, at, flat + torch.repeat_interleave(self.start + c0 - query * b, count,
                                                                                output_size=hits))
            fill = new_fill
        used = int(fill.max()) if q else 0
        return out_vals[:, :used], out_cols[:, :used], fill

    def nearest(self, vals: torch.Tensor, ids: torch.Tensor, query_ids: torch.Tensor, k: int) -> torch.Tensor:
        """Global ids of the k largest scores per query, the query's own row excluded.

        `vals`/`ids` (Q x C, ids -1 for padding) must hold at least this rank's top k+1 scores per query, e.g.
        `global_top(..., keep=k + 1)` or the full local scores with their global ids.
        """
        with torch.no_grad():
            take = min(k + 1, vals.shape[1])
            top, slot = vals.detach().topk(take, dim=1)
            ids = ids.gather(1, slot)
            top = top.masked_fill((ids == query_ids.unsqueeze(1)) | (ids < 0), float("-inf"))
            if take < k + 1:  # a tiny shard: pad so every rank gathers the same shape
                top = torch.nn.functional.pad(top, (0, k + 1 - take), value=float("-inf"))
                ids = torch.nn.functional.pad(ids, (0, k + 1 - take), value=-1)
            all_vals = coll.gather_stack(top).permute(1, 0, 2).reshape(top.shape[0], -1)
            all_ids = coll.gather_stack(ids).permute(1, 0, 2).reshape(ids.shape[0], -1)
            best = all_vals.topk(k, dim=1).indices
            return all_ids.gather(1, best)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, z: torch.Tensor, momentum: float) -> None:
        """Owner-writes EMA: V_i <- normalize(m V_i + (1 - m) v_i) for the rows this rank owns."""
        # No boolean-mask indexing (its nonzero() is a host sync on a GPU): an entry this rank does not own
        # repeats the write of an owned entry (the same row, the same value), so duplicate indices are harmless;
        # with no owned entry at all, row 0 is rewritten with itself.
        if self.world == 1:  # every row is this rank's
            rows = ids
            mixed = momentum * self.rows[rows] + (1.0 - momentum) * z.detach().to(self.rows.dtype)
            new = torch.nn.functional.normalize(mixed, dim=1)
        else:
            own = self.owned(ids)
            first_owned = own.to(torch.int8).argmax()
            src = torch.where(own, torch.arange(ids.shape[0], device=ids.device), first_owned)
            use = own[src].unsqueeze(1)
            rows = torch.where(own[src], ids[src] - self.start, torch.zeros_like(ids))
            mixed = momentum * self.rows[rows] + (1.0 - momentum) * z.detach()[src].to(self.rows.dtype)
            new = torch.where(use, torch.nn.functional.normalize(mixed, dim=1), self.rows[rows])
        mirrored = self._half is not None and self._half_key == self.rows._version
        self.rows.index_put_((rows,), new)
        if mirrored:  # keep the float16 mirror of `filter` current instead of rebuilding it
            self._half.index_put_((rows,), new.to(_FILTER_DTYPE))
            self._half_max_norm = torch.maximum(self._half_max_norm, new.norm(dim=1).max())
            self._half_key = self.rows._version

    # -- checkpoint and evaluation helpers -------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"rows": self.rows.cpu(), "start": self.start, "stop": self.stop, "n": self.n}

    def gather_full(self) -> torch.Tensor:
        """The whole bank in row order (for digests and small-scale evaluation)."""
        if self.world == 1:
            return self.rows.detach().cpu()
        base = self.n // self.world
        pad = self.n - base * (self.world - 1)
        padded = torch.zeros(pad, self.dim, device=self.rows.device)
        padded[: self.n_local] = self.rows
        parts = coll.gather_stack(padded).cpu()
        sizes = [shard_bounds(self.n, r, self.world) for r in range(self.world)]
        return torch.cat([parts[r, : stop - start] for r, (start, stop) in enumerate(sizes)])
