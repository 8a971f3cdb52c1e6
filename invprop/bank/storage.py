"""The memory bank V (N x D), split into contiguous row shards, one per rank (docs/DESIGN.md, "The sharded bank").

Rank r owns rows [start, stop). The loss never indexes a global tensor: it asks the bank for scores against the
local shard and for exact global reductions over those scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from invprop.bank.autotune import AutoSelect
from invprop.bank.reductions import kth_largest
from invprop.bank.reductions import nearest as global_nearest
from invprop.bank.select import SELECTIONS, SelectSettings, build_selections
from invprop.bank.select.base import Selected, float32_matmul, local_dots
from invprop.collectives import Comm
from invprop.data.order import shard_bounds  # the one row split, shared with the data loaders
from invprop.kernels.weighted_rows import weighted_row_sum

# Rows are initialised in fixed chunks, each from its own seed, so the bank is the same for any world size.
_INIT_CHUNK = 65536


def init_rows(start: int, stop: int, dim: int, seed: int) -> torch.Tensor:
    """Uniform(-a, a) with a = 1/sqrt(D/3), not normalised (docs/DESIGN.md, "Departures from the paper")."""
    bound = 1.0 / math.sqrt(dim / 3.0)
    out = torch.empty(stop - start, dim)
    for chunk in range(start // _INIT_CHUNK, (stop - 1) // _INIT_CHUNK + 1 if stop > start else 0):
        c0 = chunk * _INIT_CHUNK
        gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        block = torch.rand(_INIT_CHUNK, dim, generator=gen) * (2 * bound) - bound
        lo, hi = max(start, c0), min(stop, c0 + _INIT_CHUNK)
        out[lo - start : hi - start] = block[lo - c0 : hi - c0]
    return out


@dataclass
class TopCandidates:
    """This rank's share of the global top-M, per query (Q x C, padded with score -inf and id -1).

    Holds every score of this shard that is in the exact global top-M (and the local top-`keep`), possibly more
    (with `bound`: every local score at or above a per-query lower bound); `in_top` marks those in the global
    top-M (score >= `threshold`, the global M-th largest). Global ids ascend along each row where `ascending`.

    With W > 2 ranks each shard first keeps only ~2M / W scores per query (`ShardedBank.global_top`); the few
    queries for which some shard held more of their top-M than that (`redo_rows`) were selected again in full,
    and `redo` holds their candidates: for those rows, `redo` supersedes the fields above (`per_query`).
    """

    vals: torch.Tensor  # scores, differentiable in the queries
    ids: torch.Tensor
    in_top: torch.Tensor
    threshold: torch.Tensor  # (Q,)
    ascending: bool = True
    redo: TopCandidates | None = None
    redo_rows: torch.Tensor | None = None

    def per_query(self, fn: Callable[[TopCandidates, Any], torch.Tensor]) -> torch.Tensor:
        """fn(candidates, rows) -> one value per query, for every query: `rows` indexes the queries the
        candidates are for (a full slice, then `redo_rows` with `redo`, whose values replace those rows')."""
        out = fn(self, slice(None))
        if self.redo is None:
            return out
        return out.index_put((self.redo_rows,), fn(self.redo, self.redo_rows))

    @property
    def thresholds(self) -> torch.Tensor:
        """The global M-th largest score of every query (the redone queries' from their full selection)."""
        return self.per_query(lambda top, rows: top.threshold)

    @property
    def size(self) -> int:
        """Scores held, the redone queries' included (what the narrow selection bounds)."""
        return self.vals.numel() + (self.redo.vals.numel() if self.redo is not None else 0)


class _SelectedScores(torch.autograd.Function):
    """Scores z_q . V_j already computed (without grad) for a few bank rows j per query (global ids, -1 for
    padding; `start` is this shard's first id); the backward is sum_j g_qj V_j, a weighted gather of rows,
    instead of a dense (Q x n_local) matmul (`invprop.kernels.weighted_rows`: a Triton kernel on CUDA)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,  # type: ignore[override]
                vals: torch.Tensor, start: int) -> torch.Tensor:
        ctx.save_for_backward(rows, ids)  # saving `rows` makes an in-place bank update before backward fail
        ctx.z_dtype, ctx.start = z.dtype, start
        return vals.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rows, ids = ctx.saved_tensors
        # Zero weights (padding, scores outside every mask) are skipped: their ids may be -1.
        out = weighted_row_sum(rows, ids - ctx.start, grad)
        return out.to(ctx.z_dtype), None, None, None, None


class ShardedBank:
    """This rank's rows of the bank plus the collectives that make shard-local work globally exact.

    `comm` says which shard is this rank's and carries the collectives; the rows live on `device` (default:
    the comm's). `selection` names how the local top-M is found (`SELECTIONS`); `settings` holds the strategies'
    settings. `selections` are the strategy objects by name, `auto` the one that picks among them.

    A checkpoint part of its own (`invprop.state.ShardedStateful`): state_dict() is this rank's shard, and
    load_shards() takes this rank's rows from the shards of any world size.
    """

    def __init__(self, n: int, dim: int, *, comm: Comm | None = None, seed: int = 0,
                 device: torch.device | str | None = None, selection: str = "auto",
                 settings: SelectSettings | None = None) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"bank.selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.comm = comm or Comm()
        self.n, self.dim = n, dim
        self.start, self.stop = shard_bounds(n, self.comm.rank, self.comm.world)
        self._starts: torch.Tensor | None = None  # every rank's first id (owner_of)
        self.last_candidates = 0  # scores the latest global_top kept on this rank
        self.selection = selection
        self.settings = settings or SelectSettings()
        self.selections = build_selections(self.settings)
        self.auto = AutoSelect(self.selections, tune_on_cpu=self.settings.tune_on_cpu,
                               retune_after_calls=self.settings.retune_after_calls,
                               warmup_calls=self.settings.tune_warmup_calls,
                               timed_calls=self.settings.tune_timed_calls)
        self.rows = init_rows(self.start, self.stop, dim, seed).to(self.comm.device if device is None else device)

    @property
    def rows(self) -> torch.Tensor:
        """This rank's rows (n_local x D, float32)."""
        return self._rows

    @rows.setter
    def rows(self, value: torch.Tensor) -> None:
        self._rows = value
        for selection in self.selections.values():  # new rows: what was derived from the old ones is stale
            selection.forget_rows()

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def n_local(self) -> int:
        return self.stop - self.start

    # what `auto` chose and measured, and the filter's margin (reported by the trainer and the GPU check)
    @property
    def tuned(self) -> str | None:
        return self.auto.tuned

    @tuned.setter
    def tuned(self, value: str | None) -> None:
        self.auto.tuned = value  # None: measure again on the next call

    @property
    def selection_in_use(self) -> str:
        """The strategy the latest call ran (`auto` resolved; before any call, the configured name)."""
        return (self.auto.last or self.selection) if self.selection == "auto" else self.selection

    @property
    def tuning_ms(self) -> dict[str, float]:
        return self.auto.tuning_ms

    @property
    def filter_extra(self) -> int:
        return self.selections["filter"].extra

    @filter_extra.setter
    def filter_extra(self, value: int) -> None:
        self.selections["filter"].extra = value

    def local_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Scores (Q x n_local) of every gathered query against this shard; differentiable in z."""
        return z @ self.rows.t()

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.start) & (ids < self.stop)

    def pair_scores(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Global scores z_q . V_ids[q, c] (ids < 0 give 0) from the owner shards, without a full score matrix;
        differentiable in z. Each value comes from its owner only (`Comm.replicate_owned`), so every rank receives
        bit-identical values."""
        own = self.owned(ids)
        picked = local_dots(self.rows, z, torch.where(own, ids - self.start, torch.zeros_like(ids))) * own
        return self.comm.replicate_owned(picked, self.owner_of(ids))

    def owner_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank that holds each global id (padding ids < 0: rank 0, which gives them 0)."""
        if self._starts is None or self._starts.device != ids.device:
            self._starts = torch.tensor([shard_bounds(self.n, r, self.world)[0] for r in range(1, self.world)],
                                        dtype=ids.dtype, device=ids.device)
        return torch.bucketize(ids.clamp(min=0), self._starts, right=True)

    def global_top(self, z: torch.Tensor, m: int, keep: int = 0) -> TopCandidates:
        """This rank's part of the exact global top-m of every query in `z` (Q x D).

        The candidates always include the local top-max(m, keep) scores that can be in the global top-m, and the
        local top-`keep` (so `nearest` can use them too); how they are found is `selection`: with `bound` the ids
        ascend along each row, otherwise they are in no particular order. The full Q x n_local score matrix is
        never held by `bound`.

        With more than two ranks each shard first keeps its top ~2m / W per query (`narrow_width`), so the
        candidates of a rank stay near 2 x batch x m whatever W (instead of W x batch x m). That is exact unless a
        shard's last kept score reaches the global m-th largest (it may have dropped one that belongs): those
        queries, flagged on any rank and agreed with one all_reduce, are selected again in full (`redo`).
        """
        m_full = min(max(m, keep), self.n_local)
        narrow = self.narrow_width(m, keep)
        # Selection in full precision whatever autocast region the caller is in: the result must be exact.
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False), float32_matmul():
            zq = z.detach().to(self.rows.dtype)
            if narrow >= min(max(m, keep), -(-self.n // self.world)):  # no rank narrows: exact as it is
                top = self._candidates(z, zq, m, m_full)
            else:
                top = self._candidates(z, zq, m, min(narrow, m_full), trim=True)
                self._redo_short_queries(top, z, zq, m, m_full, truncated=narrow < self.n_local)
        self.last_candidates = top.size
        return top

    def _redo_short_queries(self, top: TopCandidates, z: torch.Tensor, zq: torch.Tensor, m: int, m_full: int,
                            truncated: bool) -> None:
        """Select again in full the queries for which some shard's last kept score reaches the global m-th
        largest (it may have dropped one that belongs); every rank agrees on them with one all_reduce."""
        real = top.vals > float("-inf")
        floor = torch.where(real, top.vals, torch.full_like(top.vals, float("inf"))).amin(1)
        short = (floor >= top.threshold) & truncated
        rows = (self.comm.max(short.to(torch.int32)) > 0).nonzero().squeeze(1)  # a host sync, once a step
        if rows.numel():
            top.redo = self._candidates(z, zq[rows], m, m_full, rows)
            top.redo_rows = rows

    def narrow_width(self, m: int, keep: int = 0) -> int:
        """Scores per query each shard keeps at first: about twice its share of the top-m, at least `keep`."""
        return max(keep, -(-2 * m // self.world))

    def _candidates(self, z: torch.Tensor, zq: torch.Tensor, m: int, width: int,
                    rows: torch.Tensor | None = None, trim: bool = False) -> TopCandidates:
        """Every query's local top-`width` (or a superset; with `trim` exactly that many), the global m-th
        largest over all ranks' candidates and which candidates reach it (called under no_grad on the detached
        queries `zq`, which are z's `rows`)."""
        if self.selection == "auto":  # timed while `auto` measures, over real calls
            vals, ids, ascending = self.auto.select(zq, lambda name: self.select_local(zq, width, name))
        else:
            vals, ids, ascending = self.select_local(zq, width, self.selection)
        if trim and vals.shape[1] > width:  # `bound`'s superset (~2x on the CPU): keep the narrow set narrow
            vals, slot = vals.topk(width, dim=1, sorted=False)
            ids, ascending = ids.gather(1, slot), False
        threshold = kth_largest(vals, m, self.comm)
        in_top = vals >= threshold.unsqueeze(1)
        with torch.enable_grad():  # the scores stay differentiable in z (its `rows`)
            scores = _SelectedScores.apply(z if rows is None else z[rows], self.rows, ids, vals, self.start)
        return TopCandidates(scores, ids, in_top, threshold, ascending)

    def strategy(self, zq: torch.Tensor, m_sel: int) -> str:
        """The selection this call uses: the configured one, or what `auto` picks for this device."""
        if self.selection != "auto":
            return self.selection
        return self.auto.choose(zq, lambda name: self.select_local(zq, m_sel, name))

    def autotune(self, zq: torch.Tensor, m_sel: int, repeats: int = 2) -> str:
        """Time each exact selection on these queries and keep the fastest (what `auto` does on its first call)."""
        return self.auto.measure(zq, lambda name: self.select_local(zq, m_sel, name), repeats)

    def select_local(self, zq: torch.Tensor, m_sel: int, strategy: str) -> Selected:
        """(values, global ids, ids ascending) holding this rank's local top-m_sel of every query."""
        return self.selections[strategy].select(zq, self.rows, self.start, m_sel)

    def nearest(self, vals: torch.Tensor, ids: torch.Tensor, query_ids: torch.Tensor, k: int) -> torch.Tensor:
        """Global ids of the k largest scores per query, the query's own row excluded.

        `vals`/`ids` (Q x C, ids -1 for padding) must hold at least this rank's top k+1 scores per query, e.g.
        `global_top(..., keep=k + 1)` or the full local scores with their global ids.
        """
        return global_nearest(vals, ids, query_ids, k, self.comm)

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
        version = self.rows._version
        self.rows.index_put_((rows,), new)
        for selection in self.selections.values():  # e.g. the filter's float16 mirror, kept current
            selection.rows_written(self.rows, version, rows, new)

    # -- checkpoint and evaluation helpers -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard, as a checkpoint's bank.<rank>-of-<world> file holds it."""
        return {"rows": self.rows.detach().cpu(), "start": self.start, "n": self.n}

    def row_range(self) -> tuple[int, int]:
        """The rows [start, stop) this rank owns: a checkpoint reads only the saved shards that overlap them."""
        return self.start, self.stop

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rows from one saved shard, which must cover this rank's (the same world size, or a world of one); a
        shard that does not fit raises ValueError."""
        self.load_shards([state])

    def load_shards(self, shards: Sequence[dict[str, Any]]) -> None:
        """This rank's rows [start, stop) cut from the saved shards, whatever world size saved them: each shard
        says where it starts, so only the ones overlapping this rank's range are read."""
        parts = []
        for shard in shards:
            if shard["n"] != self.n:
                raise ValueError(f"has a bank of {shard['n']} rows, this run has {self.n}")
            s_start = int(shard["start"])
            s_stop = s_start + shard["rows"].shape[0]
            if s_stop <= self.start or s_start >= self.stop:
                continue
            lo, hi = max(self.start, s_start), min(self.stop, s_stop)
            parts.append(shard["rows"][lo - s_start : hi - s_start])
        if sum(p.shape[0] for p in parts) != self.n_local:
            raise ValueError(f"is missing bank rows {self.start}..{self.stop}")
        # cat copies: nothing of a memory-mapped shard file stays referenced
        self.rows = torch.cat(parts).to(self.rows.device) if parts else self.rows.new_empty(0, self.dim)

    def gather_full(self) -> torch.Tensor:
        """The whole bank in row order (for digests and small-scale evaluation)."""
        if self.world == 1:
            return self.rows.detach().cpu()
        base = self.n // self.world
        pad = self.n - base * (self.world - 1)
        padded = torch.zeros(pad, self.dim, device=self.rows.device)
        padded[: self.n_local] = self.rows
        parts = self.comm.gather_stack(padded).cpu()
        sizes = [shard_bounds(self.n, r, self.world) for r in range(self.world)]
        return torch.cat([parts[r, : stop - start] for r, (start, stop) in enumerate(sizes)])
