"""InvP and NPID losses over a sharded bank (docs/DESIGN.md, "The algorithm", computed as "The sharded bank" says).

Each rank calls the criterion with its own batch. The returned `loss` is this rank's share of the
global mean (sum over ranks = mean over the global batch), so gradients with respect to every
embedding equal those of the dense single-process loss. The ranks are those of the bank's `Comm`: the loss
gathers and reduces over exactly the ranks the bank is sharded across, so it takes no world of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from invprop.bank import ShardedBank, TopCandidates, logsumexp_across_ranks, masked_logsumexp
from invprop.collectives import Comm
from invprop.graph import UNKNOWN, NeighbourGraph


@dataclass
class StepOutput:
    """What one loss evaluation produced; `commit` applies the deferred graph and bank updates."""

    loss: torch.Tensor  # this rank's share of the global mean
    ids: torch.Tensor  # gathered bank rows of the global batch
    embeddings: torch.Tensor  # gathered embeddings (detached), for the bank update
    neighbours: torch.Tensor | None = None  # new G rows for `ids`
    positives: torch.Tensor | None = None  # chosen positives, UNKNOWN-padded
    monitors: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-d, on the device: no host sync

    @property
    def stats(self) -> dict[str, float]:
        """The monitors as Python floats (one host sync; the trainer reads them only when it logs)."""
        return monitor_floats(self.monitors)


def monitor_floats(monitors: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d tensors (one device) to floats with a single device-to-host copy."""
    if not monitors:
        return {}
    values = torch.stack([v.detach().float() for v in monitors.values()]).tolist()
    return dict(zip(monitors, values, strict=True))


def warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """w(epoch): 0 for the first T epochs (epoch counts completed epochs), then 1."""
    return 1.0 if epoch >= warmup_epochs else 0.0


def step_stats(per_anchor: torch.Tensor, loss_ins: torch.Tensor, loss_inv: torch.Tensor, has_pos: torch.Tensor,
               w: float, own_in_top: torch.Tensor) -> dict[str, torch.Tensor]:
    """The monitored figures of one InvP step (L_inv averaged over the anchors that have positives), as 0-d
    device tensors: reading them (.item()) every step would stall the GPU queue each step."""
    return {
        "loss": per_anchor.detach().mean(),
        "loss_ins": loss_ins.detach().mean(),
        "loss_inv": loss_inv.detach().sum() / has_pos.sum().clamp(min=1),
        "inv_weight": torch.full((), w, device=per_anchor.device),
        "own_in_top_m": own_in_top.float().mean(),
        "empty_candidates": 1.0 - has_pos.float().mean(),
    }


def _local_share(per_anchor: torch.Tensor, comm: Comm) -> torch.Tensor:
    rows = per_anchor.shape[0] // comm.world
    return per_anchor[comm.rank * rows : (comm.rank + 1) * rows].sum() / per_anchor.shape[0]


class NPIDLoss:
    """Instance discrimination with a softmax over the whole bank."""

    def __init__(self, bank: ShardedBank, tau: float, bank_momentum: float) -> None:
        self.bank, self.tau, self.momentum = bank, tau, bank_momentum
        self.comm = bank.comm

    def __call__(self, z: torch.Tensor, ids: torch.Tensor, epoch: int) -> StepOutput:
        zg, idg = self.comm.gather_rows(z), self.comm.gather_rows(ids)
        scores = self.bank.local_scores(zg)
        lse = logsumexp_across_ranks(torch.logsumexp(scores / self.tau, dim=1), self.comm)
        self_logit = self.bank.pair_scores(zg, idg.view(-1, 1).long()).squeeze(1) / self.tau
        per_anchor = lse - self_logit
        loss_mean = per_anchor.detach().mean()
        return StepOutput(_local_share(per_anchor, self.comm), idg, zg.detach(),
                          monitors={"loss": loss_mean, "loss_ins": loss_mean})

    def commit(self, out: StepOutput) -> None:
        self.bank.update(out.ids, out.embeddings, self.momentum)


class InvPLoss:
    """Invariance Propagation: top-M instance term plus the propagated hard-positive term."""

    def __init__(self, bank: ShardedBank, graph: NeighbourGraph, *, tau: float, n_background: int,
                 n_pos: int, layers: int, lambda_inv: float, warmup_epochs: int, propagation: str = "concat",
                 positives: str = "hard", denominator: str = "code", bank_momentum: float = 0.5,
                 edges: str = "all") -> None:
        self.bank, self.graph, self.comm = bank, graph, bank.comm
        self.tau, self.m, self.p, self.layers = tau, min(n_background, bank.n), n_pos, layers
        self.lambda_inv, self.warmup_epochs, self.momentum = lambda_inv, warmup_epochs, bank_momentum
        self.propagation, self.positives, self.denominator = propagation, positives, denominator
        self.mutual = edges == "mutual"

    def __call__(self, z: torch.Tensor, ids: torch.Tensor, epoch: int) -> StepOutput:
        zg, idg = self.comm.gather_rows(z), self.comm.gather_rows(ids).long()
        # This rank's scores at or above a bound of the M-th largest (never the full Q x n_local matrix),
        # with the exact global threshold; also holds the local top-(k+1) for the graph update.
        top = self.bank.global_top(zg, self.m, keep=self.graph.k + 1)
        lse_top = logsumexp_across_ranks(top.per_query(lambda t, rows: masked_logsumexp(t.vals, t.in_top,
                                                                                         tau=self.tau)), self.comm)

        w = warmup_weight(epoch, self.warmup_epochs)
        with torch.no_grad():
            cands = self.graph.candidates(idg, self.layers, self.propagation, self.mutual)
        cand_valid = cands != UNKNOWN
        picked = self.bank.pair_scores(zg, torch.cat([idg.view(-1, 1), cands], dim=1))
        self_score, cand_scores = picked[:, 0], picked[:, 1:]
        loss_ins = lse_top - self_score / self.tau
        pos_slot = self._pick_positives(cand_scores.detach(), cand_valid)
        pos_valid = cand_valid.gather(1, pos_slot)
        pos_logits = cand_scores.gather(1, pos_slot) / self.tau
        numerator = masked_logsumexp(pos_logits, pos_valid)
        denominator = self._denominator(top, idg, cands, numerator)
        has_pos = pos_valid.any(dim=1)
        loss_inv = torch.where(has_pos, denominator - numerator, torch.zeros_like(numerator))

        per_anchor = loss_ins + self.lambda_inv * w * loss_inv
        neighbours = self.bank.nearest(top.vals.detach(), top.ids, idg, self.graph.k)
        positives = torch.where(pos_valid, cands.gather(1, pos_slot), torch.full_like(pos_slot, UNKNOWN))
        own_in_top = (self_score.detach() >= top.thresholds).float()
        stats = step_stats(per_anchor, loss_ins, loss_inv, has_pos, w, own_in_top)
        return StepOutput(_local_share(per_anchor, self.comm), idg, zg.detach(), neighbours, positives, stats)

    def _pick_positives(self, cand_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Slots of the P lowest-scoring (hard) or highest-scoring (easy) valid candidates."""
        hard = self.positives == "hard"
        fill = float("inf") if hard else float("-inf")
        ranked = cand_scores.masked_fill(~valid, fill)
        return ranked.topk(min(self.p, ranked.shape[1]), dim=1, largest=not hard).indices

    def _denominator(self, top: TopCandidates, idg: torch.Tensor, cands: torch.Tensor,
                     numerator: torch.Tensor) -> torch.Tensor:
        if self.denominator == "code":
            # N_M(i) without i itself, excluded only where it is actually in N_M(i).
            def without_self(t: TopCandidates, rows: Any) -> torch.Tensor:
                return masked_logsumexp(t.vals, t.in_top & (t.ids != idg[rows].view(-1, 1)), tau=self.tau)

            return logsumexp_across_ranks(top.per_query(without_self), self.comm)

        # paper: (N_M(i) minus all candidates) union H(i).
        def without_candidates(t: TopCandidates, rows: Any) -> torch.Tensor:
            return masked_logsumexp(t.vals, t.in_top & ~_is_candidate(t, cands[rows]), tau=self.tau)

        rest = logsumexp_across_ranks(top.per_query(without_candidates), self.comm)
        return torch.logaddexp(rest, numerator)

    def commit(self, out: StepOutput) -> None:
        """Graph update (from this step's scores) and owner-writes bank update; call after optimizer.step()."""
        self.graph.update(out.ids, out.neighbours)
        self.bank.update(out.ids, out.embeddings, self.momentum)


@torch.no_grad()
def _is_candidate(top: TopCandidates, cands: torch.Tensor) -> torch.Tensor:
    """Which of `top`'s entries are among each query's candidates: each candidate is looked up (binary search) in
    its row of ids, Q x K searches, rather than each of the Q x ~M ids among the candidates."""
    width = top.ids.shape[1]
    ordered = torch.where(top.ids >= 0, top.ids, torch.full_like(top.ids, torch.iinfo(torch.int64).max))
    order = None
    if not top.ascending:
        ordered, order = ordered.sort(dim=1)
    slot = torch.searchsorted(ordered, cands.contiguous()).clamp(max=width - 1)
    found = (ordered.gather(1, slot) == cands) & (cands >= 0)
    if order is not None:
        slot = order.gather(1, slot)
    is_cand = torch.zeros(top.ids.shape[0], width + 1, dtype=torch.bool, device=top.ids.device)
    is_cand.scatter_(1, torch.where(found, slot, torch.full_like(slot, width)), True)
    return is_cand[:, :width]
