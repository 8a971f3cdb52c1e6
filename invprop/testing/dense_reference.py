"""A dense, single-process, vectorised InvP step (docs/DESIGN.md, "The algorithm") on the full bank: the baseline
of `tools/bench_bank.py`.

This is what a careful implementation without sharding looks like: the whole (B x N) score matrix,
`torch.topk` over it for the top-M background set, candidates by indexing the neighbour table, hard (or easy)
positives, every log-sum in log space, then the graph and bank updates. It must agree with `InvPLoss` at
world size 1 (tests/test_bench_bank.py checks loss, gradients, positives, neighbour table and bank).

It imports nothing from the modules it checks: the propagation (`candidates`) and the monitored figures
(`step_monitors`) are written here again from the definition, in another way than invprop/graph.py and invprop/loss.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

UNKNOWN = -1  # a neighbour-table entry not written yet, and the padding of candidate and positive lists


@dataclass
class DenseStep:
    loss: torch.Tensor  # mean over the batch
    ids: torch.Tensor
    embeddings: torch.Tensor  # detached, for the bank update
    neighbours: torch.Tensor  # new neighbour-table rows for `ids`
    positives: torch.Tensor  # chosen positives, UNKNOWN-padded
    monitors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.monitors.items()}


def candidates(table: torch.Tensor, ids: torch.Tensor, layers: int, mode: str) -> torch.Tensor:
    """Candidate positives of each anchor on the kNN table, UNKNOWN-padded to k + k^2 + ... + k^layers columns.

    concat: layer by layer, the table rows of every entry of the layer before (the anchor for layer 1), in order,
    duplicates kept; an UNKNOWN entry has k UNKNOWN children. bfs: each node within graph distance 1..layers
    once, at its first discovery, the anchor itself never; UNKNOWN where concat repeats a node.
    """
    table, ids = table.long(), ids.long()
    n, k = table.shape
    # one extra row (index n) stands for UNKNOWN: its children are UNKNOWN too
    padded = torch.cat([torch.where(table < 0, n, table), torch.full((1, k), n, device=table.device)])
    walk, layer = [], ids.view(-1, 1)
    for _ in range(layers):
        layer = padded[layer].flatten(1)  # (Q, k^depth), parents' children in the parents' order
        walk.append(layer)
    cands = torch.cat(walk, dim=1)
    if mode == "bfs":
        # a node already seen earlier in the walk (or the anchor) is dropped; the walk lists nearer layers first
        seen_before = (cands.unsqueeze(2) == cands.unsqueeze(1)).tril(diagonal=-1).any(dim=2)
        cands = cands.masked_fill(seen_before | (cands == ids.view(-1, 1)), n)
    elif mode != "concat":
        raise ValueError(f"propagation must be 'concat' or 'bfs', got {mode!r}")
    return torch.where(cands == n, UNKNOWN, cands)


def step_monitors(per_anchor: torch.Tensor, loss_ins: torch.Tensor, loss_inv: torch.Tensor, has_pos: torch.Tensor,
             w: float, own_in_top: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step's monitored figures (docs/DESIGN.md): means over the batch, L_inv over the anchors with positives."""
    with torch.no_grad():
        anchors = float(per_anchor.shape[0])
        with_pos = float(has_pos.sum())
        return {
            "loss": per_anchor.sum() / anchors,
            "loss_ins": loss_ins.sum() / anchors,
            "loss_inv": loss_inv.sum() / with_pos if with_pos else loss_inv.sum() * 0.0,
            "inv_weight": torch.tensor(w),
            "own_in_top_m": own_in_top.float().sum() / anchors,
            "empty_candidates": torch.tensor(1.0 - with_pos / anchors),
        }


def logsumexp_where(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp over the kept entries; -inf (and no NaN gradient) where a row keeps none."""
    keep = keep & (x > float("-inf"))
    some = keep.any(dim=1)
    masked = x.masked_fill(~keep, float("-inf"))
    masked = torch.where(some.unsqueeze(1), masked, torch.zeros_like(masked))
    return torch.where(some, torch.logsumexp(masked, dim=1), torch.full_like(x[:, 0], float("-inf")))


class DenseInvP:
    """InvP over a full bank `bank` (N x D) and neighbour table `table` (N x k, int, UNKNOWN = -1)."""

    def __init__(self, bank: torch.Tensor, table: torch.Tensor, *, tau: float, n_background: int, n_pos: int,
                 layers: int, lambda_inv: float, warmup_epochs: int, propagation: str = "concat",
                 positives: str = "hard", denominator: str = "code", bank_momentum: float = 0.5) -> None:
        self.bank, self.table = bank, table
        self.tau, self.m, self.p, self.layers = tau, min(n_background, bank.shape[0]), n_pos, layers
        self.lambda_inv, self.warmup_epochs, self.momentum = lambda_inv, warmup_epochs, bank_momentum
        self.propagation, self.positives, self.denominator = propagation, positives, denominator

    def __call__(self, z: torch.Tensor, ids: torch.Tensor, epoch: int) -> DenseStep:
        ids = ids.long()
        k = self.table.shape[1]
        scores = z @ self.bank.t()  # (B, N)
        top_vals, top_idx = scores.topk(self.m, dim=1)
        top_logits = top_vals / self.tau
        self_score = scores.gather(1, ids.view(-1, 1)).squeeze(1)
        loss_ins = torch.logsumexp(top_logits, dim=1) - self_score / self.tau

        with torch.no_grad():
            cands = candidates(self.table, ids, self.layers, self.propagation)
        valid = cands != UNKNOWN
        cand_scores = scores.gather(1, cands.clamp(min=0))
        hard = self.positives == "hard"
        ranked = cand_scores.detach().masked_fill(~valid, float("inf") if hard else float("-inf"))
        slot = ranked.topk(min(self.p, cands.shape[1]), dim=1, largest=not hard).indices
        pos_valid = valid.gather(1, slot)
        numerator = logsumexp_where(cand_scores.gather(1, slot) / self.tau, pos_valid)
        if self.denominator == "code":
            denominator = logsumexp_where(top_logits, top_idx != ids.view(-1, 1))
        else:  # paper: (top-M minus every candidate) union the chosen positives
            is_cand = (top_idx.unsqueeze(2) == cands.unsqueeze(1)).any(dim=2)
            denominator = torch.logaddexp(logsumexp_where(top_logits, ~is_cand), numerator)
        has_pos = pos_valid.any(dim=1)
        loss_inv = torch.where(has_pos, denominator - numerator, torch.zeros_like(numerator))
        w = 1.0 if epoch >= self.warmup_epochs else 0.0
        per_anchor = loss_ins + self.lambda_inv * w * loss_inv

        with torch.no_grad():  # graph update: the k best rows, the anchor's own excluded
            if self.m >= k + 1:
                near_vals, near_idx = top_vals[:, : k + 1].detach(), top_idx[:, : k + 1]
            else:
                near_vals, near_idx = scores.detach().topk(min(k + 1, scores.shape[1]), dim=1)
            near_vals = near_vals.masked_fill(near_idx == ids.view(-1, 1), float("-inf"))
            neighbours = near_idx.gather(1, near_vals.topk(k, dim=1).indices)
            own_in_top = (top_idx == ids.view(-1, 1)).any(dim=1).float()
        chosen = torch.where(pos_valid, cands.gather(1, slot), torch.full_like(slot, UNKNOWN))
        stats = step_monitors(per_anchor, loss_ins, loss_inv, has_pos, w, own_in_top)
        return DenseStep(per_anchor.mean(), ids, z.detach(), neighbours, chosen, stats)

    @torch.no_grad()
    def commit(self, out: DenseStep) -> None:
        """Graph update, then V_i <- normalize(m V_i + (1 - m) v_i); call after the optimiser step."""
        self.table[out.ids] = out.neighbours.to(self.table.dtype)
        mixed = self.momentum * self.bank[out.ids] + (1.0 - self.momentum) * out.embeddings.to(self.bank.dtype)
        self.bank[out.ids] = torch.nn.functional.normalize(mixed, dim=1)
