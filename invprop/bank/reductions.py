"""The cross-rank reductions that make shard-local work globally exact (docs/DESIGN.md, "One step over W ranks"):
logsumexps combined over ranks, the exact global k-th largest score, the global nearest rows."""

from __future__ import annotations

import torch

from invprop.collectives import Comm


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


def logsumexp_across_ranks(local: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Combine per-rank logsumexp values into the global one, differentiably."""
    if comm.world == 1:
        return local
    peak = comm.max(local.detach())
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = comm.sum(torch.exp(local - peak))
    return _safe_log(total) + peak


_DIGIT_BITS = 4
_BINS = 1 << _DIGIT_BITS


def kth_largest(top_vals: torch.Tensor, k: int, comm: Comm) -> torch.Tensor:
    """Exact global k-th largest score per query, from any superset of each of the ranks' local top-k
    values (in any order; -inf padding allowed as long as the ranks hold k real values between them).

    Radix select on order-preserving integer keys: 8 rounds of all-reduced 16-bin int32 histograms (Q x 64
    bytes a round: a sixteenth of 4 rounds of 256 int64 bins, for 4 more round trips of a few microseconds).
    """
    if comm.world == 1:
        if top_vals.shape[1] == k:
            return top_vals.detach().amin(1)
        return top_vals.detach().topk(k, dim=1, sorted=False).values.amin(1)
    keys = _float_to_ordered(top_vals.detach().float())
    q = keys.shape[0]
    need = torch.full((q,), k, dtype=torch.int64, device=keys.device)
    prefix = torch.zeros(q, dtype=torch.int64, device=keys.device)
    for shift in range(32 - _DIGIT_BITS, -1, -_DIGIT_BITS):
        high = shift + _DIGIT_BITS
        match = (keys >> high) == (prefix >> high).unsqueeze(1)
        digit = (keys >> shift) & (_BINS - 1)
        hist = torch.zeros(q, _BINS, dtype=torch.int32, device=keys.device)
        hist.scatter_add_(1, digit, match.to(torch.int32))
        hist = comm.sum(hist).to(torch.int64)
        at_or_above = hist.flip(1).cumsum(1).flip(1)
        chosen = (at_or_above >= need.unsqueeze(1)).sum(1) - 1
        above = torch.where(chosen < _BINS - 1,
                            at_or_above.gather(1, (chosen + 1).clamp(max=_BINS - 1).unsqueeze(1)).squeeze(1),
                            torch.zeros_like(chosen))
        need = need - above
        prefix = prefix | (chosen << shift)
    return _ordered_to_float(prefix)


@torch.no_grad()
def nearest(vals: torch.Tensor, ids: torch.Tensor, query_ids: torch.Tensor, k: int, comm: Comm) -> torch.Tensor:
    """Global ids of the k largest scores per query over every rank, the query's own row excluded.

    `vals`/`ids` (Q x C, ids -1 for padding) must hold at least this rank's top k+1 scores per query.
    """
    take = min(k + 1, vals.shape[1])
    top, slot = vals.detach().topk(take, dim=1)
    ids = ids.gather(1, slot)
    top = top.masked_fill((ids == query_ids.unsqueeze(1)) | (ids < 0), float("-inf"))
    if take < k + 1:  # a tiny shard: pad so every rank gathers the same shape
        top = torch.nn.functional.pad(top, (0, k + 1 - take), value=float("-inf"))
        ids = torch.nn.functional.pad(ids, (0, k + 1 - take), value=-1)
    if comm.world == 1:
        return ids.gather(1, top.topk(k, dim=1).indices)
    # Each query's candidates go only to the rank whose batch it came from (an all_to_all: Q x (k+1) entries
    # leave each rank, not W times that), which picks its queries' k nearest; the picks are then gathered.
    q, width = top.shape
    mine = q // comm.world
    all_vals = comm.all_to_all_rows(top).view(comm.world, mine, width).permute(1, 0, 2).reshape(mine, -1)
    all_ids = comm.all_to_all_rows(ids).view(comm.world, mine, width).permute(1, 0, 2).reshape(mine, -1)
    best = all_vals.topk(k, dim=1).indices
    return comm.gather_rows(all_ids.gather(1, best))
