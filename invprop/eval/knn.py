"""Weighted kNN (K=200, sigma=0.07) over a reference set that may be sharded across ranks.

Like DINOv2's evaluator: each rank finds its local top-K, the K*W candidates are gathered, and the
final top-K is taken from them, so the answer equals the single-process one.
"""

from __future__ import annotations

import torch

from invprop.collectives import Comm


@torch.no_grad()
def knn_predict(queries: torch.Tensor, ref_feats: torch.Tensor, ref_labels: torch.Tensor, num_classes: int,
                k: int = 200, sigma: float = 0.07, chunk: int = 1024, comm: Comm | None = None) -> torch.Tensor:
    """Class scores (Q x C) from votes sum exp(sim / sigma) of the K nearest references.

    `ref_feats`/`ref_labels` are this rank's shard of the ranks of `comm` (default: one process); `queries` are
    the same on every rank.
    """
    comm = comm or Comm()
    out = []
    for lo in range(0, queries.shape[0], chunk):
        q = queries[lo : lo + chunk]
        sims = q @ ref_feats.t()
        take = min(k, sims.shape[1])
        vals, cols = sims.topk(take, dim=1)
        labels = ref_labels[cols]
        if take < k:  # a shard smaller than K: pad so every rank gathers the same shape
            vals = torch.nn.functional.pad(vals, (0, k - take), value=float("-inf"))
            labels = torch.nn.functional.pad(labels, (0, k - take), value=0)
        all_vals = comm.gather_stack(vals).permute(1, 0, 2).reshape(q.shape[0], -1)
        all_labels = comm.gather_stack(labels).permute(1, 0, 2).reshape(q.shape[0], -1)
        best_vals, best = all_vals.topk(min(k, all_vals.shape[1]), dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float64, device=q.device)
        weights = torch.exp(best_vals.double() / sigma)  # exp(-inf) = 0 drops padding
        votes.scatter_add_(1, all_labels.gather(1, best), weights)
        out.append(votes)
    return torch.cat(out)


def knn_top1(queries: torch.Tensor, query_labels: torch.Tensor, ref_feats: torch.Tensor, ref_labels: torch.Tensor,
             num_classes: int, k: int = 200, sigma: float = 0.07, comm: Comm | None = None) -> float:
    """Top-1 accuracy (fraction in 0..1) of weighted kNN (references sharded over the ranks of `comm`)."""
    votes = knn_predict(queries, ref_feats, ref_labels, num_classes, k, sigma, comm=comm)
    return (votes.argmax(1).cpu() == query_labels.cpu()).float().mean().item()
