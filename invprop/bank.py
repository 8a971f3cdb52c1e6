"""The memory bank V (N x D), split into contiguous row shards, one per rank.

Rank r owns rows [start, stop). The loss never indexes a global tensor: it asks the bank for
scores against the local shard and for exact global reductions over those scores.
"""

from __future__ import annotations

import math

import torch

from invprop import collectives as coll

# Rows are initialised in fixed chunks, each from its own seed, so the bank is the same for any world size.
_INIT_CHUNK = 65536


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


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """logsumexp over the entries where mask is true; -inf (with a zero gradient) where none is."""
    masked = x.masked_fill(~mask, float("-inf"))
    peak = masked.detach().amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(masked - peak).sum(dim=dim)
    return _safe_log(total) + peak.squeeze(dim)


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


class ShardedBank:
    """This rank's rows of the bank plus the collectives that make shard-local work globally exact."""

    def __init__(self, n: int, dim: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.n, self.dim, self.rank, self.world = n, dim, rank, world
        self.start, self.stop = shard_bounds(n, rank, world)
        self.rows = init_rows(self.start, self.stop, dim, seed).to(device)

    @property
    def n_local(self) -> int:
        return self.stop - self.start

    def local_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Scores (Q x n_local) of every gathered query against this shard; differentiable in z."""
        return z @ self.rows.t()

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.start) & (ids < self.stop)

    def lookup(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Global scores s[q, ids[q, c]] from their owner shards (ids < 0 give 0); differentiable.

        Non-owners contribute exact zeros, so every rank receives bit-identical values.
        """
        own = self.owned(ids)
        local_cols = torch.where(own, ids - self.start, torch.zeros_like(ids))
        picked = scores.gather(1, local_cols) * own
        return coll.sum_across_ranks(picked)

    def kth_largest(self, top_vals: torch.Tensor, k: int) -> torch.Tensor:
        """Exact global k-th largest score per query, from each rank's local top-k values.

        Radix select on order-preserving integer keys: 4 rounds of all-reduced 256-bin histograms.
        """
        if self.world == 1:
            return top_vals[:, k - 1]
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

    def global_top(self, scores: torch.Tensor, m: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local part of the global top-m: (values with grad, global ids, in-top-m mask, global threshold)."""
        m_local = min(m, self.n_local)
        with torch.no_grad():
            _, cols = scores.detach().topk(m_local, dim=1)
        vals = scores.gather(1, cols)
        threshold = self.kth_largest(vals.detach(), m)
        return vals, cols + self.start, vals.detach() >= threshold.unsqueeze(1), threshold

    def nearest(self, scores: torch.Tensor, query_ids: torch.Tensor, k: int) -> torch.Tensor:
        """Global ids of the k largest scores per query, the query's own row excluded."""
        with torch.no_grad():
            take = min(k + 1, self.n_local)
            vals, cols = scores.detach().topk(take, dim=1)
            ids = cols + self.start
            vals = vals.masked_fill(ids == query_ids.unsqueeze(1), float("-inf"))
            if take < k + 1:  # a tiny shard: pad so every rank gathers the same shape
                vals = torch.nn.functional.pad(vals, (0, k + 1 - take), value=float("-inf"))
                ids = torch.nn.functional.pad(ids, (0, k + 1 - take), value=-1)
            all_vals = coll.gather_stack(vals).permute(1, 0, 2).reshape(vals.shape[0], -1)
            all_ids = coll.gather_stack(ids).permute(1, 0, 2).reshape(ids.shape[0], -1)
            best = all_vals.topk(k, dim=1).indices
            return all_ids.gather(1, best)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, z: torch.Tensor, momentum: float) -> None:
        """Owner-writes EMA: V_i <- normalize(m V_i + (1 - m) v_i) for the rows this rank owns."""
        own = self.owned(ids)
        rows = ids[own] - self.start
        mixed = momentum * self.rows[rows] + (1.0 - momentum) * z.detach()[own].to(self.rows.dtype)
        self.rows[rows] = torch.nn.functional.normalize(mixed, dim=1)

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
