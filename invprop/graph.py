"""The kNN neighbour table G (N x k), replicated on every rank, and positive discovery on it."""

from __future__ import annotations

from typing import Any

import torch

UNKNOWN = -1


class NeighbourGraph:
    """G[i] holds the k bank rows most similar to i; UNKNOWN until row i is first written."""

    def __init__(self, n: int, k: int, device: torch.device | str = "cpu") -> None:
        self.n, self.k = n, k
        # int32 keeps an ImageNet-scale table at 20 MB (docs/DESIGN.md, "Rows sharded by rank").
        self.table = torch.full((n, k), UNKNOWN, dtype=torch.int32, device=device)

    def candidates(self, ids: torch.Tensor, layers: int, mode: str, mutual: bool = False) -> torch.Tensor:
        """Candidate positives per anchor, padded with UNKNOWN: shape (Q, k + k^2 + ... + k^layers).

        concat: every layer's entries, duplicates kept (the authors' code).
        bfs: the distinct nodes at graph distance 1..layers, the anchor itself excluded (the paper).
        Walks of length <= l reach exactly the nodes within distance l, so bfs is concat deduplicated.
        mutual: walk only edges u -> v where u is also among v's k neighbours (beyond the paper: a one-way
        neighbour is more often another class's image).
        """
        return propagate(self.table, ids, layers, mode, mutual)

    def update(self, ids: torch.Tensor, neighbours: torch.Tensor) -> None:
        self.table[ids.long()] = neighbours.to(self.table.dtype)

    # The table is replicated (every rank applies the same updates), so rank 0's copy is the checkpoint's.
    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table.copy_(state["table"].to(self.table.device))


def propagate(table: torch.Tensor, ids: torch.Tensor, layers: int, mode: str, mutual: bool = False) -> torch.Tensor:
    """Candidates of `ids` on neighbour table `table` (see NeighbourGraph.candidates); children of UNKNOWN
    entries are UNKNOWN."""
    frontier = ids.view(-1, 1).long()
    layers_out = []
    for _ in range(layers):
        known = frontier >= 0
        nxt = table[frontier.clamp(min=0)].long()  # (Q, F, k)
        nxt = torch.where(known.unsqueeze(-1), nxt, torch.full_like(nxt, UNKNOWN))
        if mutual:  # keep v only where the node it was reached from is among v's own neighbours
            back = table[nxt.clamp(min=0)].long()  # (Q, F, k, k)
            returns = (back == frontier.view(*frontier.shape, 1, 1)).any(dim=-1)
            nxt = torch.where(returns & (nxt >= 0), nxt, torch.full_like(nxt, UNKNOWN))
        frontier = nxt.reshape(ids.shape[0], -1)
        layers_out.append(frontier)
    cands = torch.cat(layers_out, dim=1)
    if mode == "concat":
        return cands
    if mode != "bfs":
        raise ValueError(f"method.propagation must be 'concat' or 'bfs', got {mode!r}")
    cands = cands.masked_fill(cands == ids.view(-1, 1).long(), UNKNOWN)
    ordered, _ = cands.sort(dim=1)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return ordered.masked_fill(repeat, UNKNOWN)
