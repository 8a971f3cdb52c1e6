"""`bound`: a sampled lower bound of the local m-th largest score, then only the scores above it are kept."""

from __future__ import annotations

import math

import torch

from invprop.bank.select.base import Selected, Selection, replace_rows
from invprop.bank.select.topk import TopK

_COMPILED: object = None  # the compiled numba kernel (a cache, not a setting); False where numba is unavailable


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


def compiled_collect():
    """The numba-compiled `_collect_hits`, or None where numba is unavailable."""
    global _COMPILED
    if _COMPILED is None:
        try:
            import numba
        except ImportError:  # pragma: no cover
            _COMPILED = False
        else:
            _COMPILED = numba.njit(nogil=True, cache=True)(_collect_hits)
    return _COMPILED or None


class SampledBound(Selection):
    """Per query, a cheap lower bound of the local m-th largest score from a strided sample of the shard; the shard
    is then scored in column chunks and only the scores at or above the bound are kept, ids ascending. Where the
    bound overshoots (fewer than m scores reach it) the query's exact local top-m is taken instead, so the
    result never depends on the sample.

    Settings: `sample_hits`, the expected number of sampled scores above the m-th largest, and `sample_sigmas`,
    how many standard deviations the bound sits below it (192 and 5: ~1e-6 of queries per step need the exact
    fallback, and the kept set is ~(1 + 5/sqrt(192)) m); `min_shard_over_m`, below this many times m rows the
    bound is not worth it (most scores would pass it) and `topk` runs instead; `block`, consecutive scores whose
    maximum is tested first where hits are sparse; `use_numba`, the CPU's compare-and-compact as one numba loop
    (a single pass writing only the hits, ~4x cheaper than the torch ops) or the torch ops; `chunk_elements`,
    scores per chunk of the scan and the sample (None: cache-sized on the CPU, large elsewhere).
    """

    name = "bound"

    def __init__(self, topk: TopK, *, sample_hits: int = 192, sample_sigmas: float = 5.0,
                 min_shard_over_m: int = 8, block: int = 32, use_numba: bool = True,
                 chunk_elements: int | None = None) -> None:
        self.topk = topk
        self.sample_hits, self.sample_sigmas, self.min_shard_over_m = sample_hits, sample_sigmas, min_shard_over_m
        self.block, self.use_numba, self.chunk_elements = block, use_numba, chunk_elements

    def select(self, zq: torch.Tensor, rows: torch.Tensor, start: int, m: int) -> Selected:
        bound, expect = self.sample_bound(zq, rows, m)
        if bound is None:
            return self.topk.select(zq, rows, start, m)
        vals, ids, count = self.scan(zq, rows, start, bound, expect)
        short = (count < m).nonzero().squeeze(1)
        if short.numel():  # the sampled bound overshot for these queries: their exact local top-m
            # Values and ids from one evaluation: a rescan with the exact bound would need two GEMMs of different
            # shapes to agree to the last bit, which a GPU's GEMMs need not.
            exact_vals, exact_ids = self.topk.exact(zq[short], rows, start, m)
            exact_ids, order = exact_ids.sort(dim=1)  # ids ascend along each row, as scanned rows' do
            vals, ids = replace_rows(vals, ids, short, exact_vals.gather(1, order), exact_ids)
        return vals, ids, True

    def chunk_for(self, device: torch.device) -> int:
        """Scores per chunk of the scan and of the sample: cache-sized on the CPU, large elsewhere (fewer
        launches)."""
        if self.chunk_elements is not None:
            return self.chunk_elements
        return 1 << 20 if device.type == "cpu" else 1 << 26

    def sample_bound(self, zq: torch.Tensor, rows: torch.Tensor, m: int) -> tuple[torch.Tensor | None, int]:
        """Per query, a value that w.h.p. lies at or just below the m-th largest local score (None: no bound
        worth having), and a generous guess of how many scores reach it.

        It is (at most) the r-th largest score of a strided column sample, r a few sigmas above the expected
        number of sampled scores above the m-th largest. On a large sample the r-th largest of the maxima of
        blocks of `block` sampled scores stands in for it: a lower bound of it (r blocks reach it, so r scores
        do), a little looser, and far cheaper to select than from every sampled score.
        """
        n, block = rows.shape[0], self.block
        if n < self.min_shard_over_m * m:
            return None, n
        stride = max(4, n // math.ceil(self.sample_hits * n / m))  # at most a quarter of the shard
        sample = rows[::stride]
        s = sample.shape[0]
        mean = m * s / n
        spread = math.sqrt(mean * (1.0 - m / n) * max(0.0, (n - s) / max(1, n - 1)))
        r = max(1, min(s, math.ceil(mean + self.sample_sigmas * spread) + 1))
        q, blocks = zq.shape[0], s // block
        if blocks >= 4 * r:  # block maxima, the sample scored in chunks (never held whole)
            chunk = max(1, self.chunk_for(zq.device) // max(1, q) // block) * block
            scores = torch.empty(q, blocks, dtype=rows.dtype, device=zq.device)
            buffer = torch.empty(q * min(chunk, blocks * block), dtype=rows.dtype, device=zq.device)
            for c0 in range(0, blocks * block, chunk):
                part = sample[c0 : min(c0 + chunk, blocks * block)]
                out = buffer[: q * part.shape[0]].view(q, part.shape[0])
                torch.matmul(zq, part.t(), out=out)
                scores[:, c0 // block : c0 // block + part.shape[0] // block] = out.view(q, -1, block).amax(2)
        else:
            scores = zq @ sample.t()
        bound = scores.topk(r, dim=1, sorted=False).values.amin(1)
        return bound, math.ceil((r + 3.0 * math.sqrt(r)) * n / s)

    def kernel(self, device: torch.device):
        """The numba compare-and-compact for this device, or None for the torch path."""
        return compiled_collect() if self.use_numba and device.type == "cpu" else None

    def scan(self, zq: torch.Tensor, rows: torch.Tensor, start: int, bound: torch.Tensor, width: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every local score >= bound[q], per query in ascending column order, padded with (-inf, -1).

        Returns (values, global ids, count per query); `width` is a guess of the largest count. The shard is
        scored in column chunks, each into the same buffer.
        """
        q, n, dev, block = zq.shape[0], rows.shape[0], zq.device, self.block
        chunk = max(block, self.chunk_for(dev) // max(1, q) // block * block)
        width = max(1, width)
        # Sparse hits (the usual case for n >> M): test per-block maxima first, then only the blocks that reach
        # the bound. Dense hits: test every score.
        blocked = width * block < n // 4
        out_vals = torch.full((q, width), float("-inf"), dtype=rows.dtype, device=dev)
        out_cols = torch.full((q, width), -1, dtype=torch.int64, device=dev)
        fill = torch.zeros(q, dtype=torch.int64, device=dev)
        query = torch.arange(q, dtype=torch.int64, device=dev)
        lower = bound.unsqueeze(1).to(rows.dtype)
        buffer = torch.empty(q * min(chunk, n), dtype=rows.dtype, device=dev)
        kernel = self.kernel(dev)
        if kernel is not None:
            lower_np = lower.view(-1).contiguous().numpy()
        for c0 in range(0, n, chunk):
            part = rows[c0 : c0 + chunk]
            b = part.shape[0]
            s = buffer[: q * b].view(q, b)
            torch.matmul(zq, part.t(), out=s)
            if kernel is not None:
                before = fill.clone()
                kernel(s.numpy(), lower_np, out_vals.numpy(), out_cols.numpy(), fill.numpy(), start + c0)
                need = int(fill.max())
                if need > width:  # more hits than guessed: widen the output and collect this chunk again
                    grow = max(need, 2 * width) - width
                    out_vals = torch.nn.functional.pad(out_vals, (0, grow), value=float("-inf"))
                    out_cols = torch.nn.functional.pad(out_cols, (0, grow), value=-1)
                    width += grow
                    fill.copy_(before)
                    kernel(s.numpy(), lower_np, out_vals.numpy(), out_cols.numpy(), fill.numpy(), start + c0)
                continue
            flat, vals = self.hits(s, lower, block if blocked and b % block == 0 else 1)
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
            out_cols.view(-1).index_copy_(0, at, flat + torch.repeat_interleave(start + c0 - query * b, count,
                                                                                output_size=hits))
            fill = new_fill
        used = int(fill.max()) if q else 0
        return out_vals[:, :used], out_cols[:, :used], fill

    @staticmethod
    def hits(s: torch.Tensor, lower: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-major flat positions, and values, of the entries of s (q x b) that are >= lower (q x 1).

        With block > 1 (dividing b) the per-block maxima are tested first and only blocks that reach the bound
        are looked into: the same result, much cheaper when hits are sparse (one block max pass instead of a
        compare and a nonzero over every score).
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
