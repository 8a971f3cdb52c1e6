"""Weighted kNN (K=200, sigma=0.07) over a reference set that may be sharded across ranks.

Like DINOv2's evaluator: each rank finds its local top-K, the K*W candidates are gathered, and the
final top-K is taken from them, so the answer equals the single-process one.
"""

from __future__ import annotations

import torch

from invprop.collectives import Comm


def _local_topk(queries: torch.Tensor, ref_feats: torch.Tensor, ref_labels: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's K most similar rows of this rank's shard: (similarities, labels), both Q x K. A shard
    smaller than K is padded (similarity -inf, label 0) so that every rank exchanges the same shape."""
    sims = queries @ ref_feats.t()
    take = min(k, sims.shape[1])
    vals, cols = sims.topk(take, dim=1)
    labels = ref_labels[cols]
    if take < k:
        vals = torch.nn.functional.pad(vals, (0, k - take), value=float("-inf"))
        labels = torch.nn.functional.pad(labels, (0, k - take), value=0)
    return vals, labels


def _vote(cand_vals: torch.Tensor, cand_labels: torch.Tensor, num_classes: int, k: int,
          sigma: float) -> torch.Tensor:
    """Class scores (Q x C, float64) from the K best of each query's gathered candidates: the sum of
    exp(sim / sigma) per label; padding (-inf) weighs exp(-inf) = 0."""
    best_vals, best = cand_vals.topk(min(k, cand_vals.shape[1]), dim=1)
    votes = torch.zeros(cand_vals.shape[0], num_classes, dtype=torch.float64, device=cand_vals.device)
    votes.scatter_add_(1, cand_labels.gather(1, best), torch.exp(best_vals.double() / sigma))
    return votes


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
        vals, labels = _local_topk(q, ref_feats, ref_labels, k)
        all_vals = comm.gather_stack(vals).permute(1, 0, 2).reshape(q.shape[0], -1)
        all_labels = comm.gather_stack(labels).permute(1, 0, 2).reshape(q.shape[0], -1)
        out.append(_vote(all_vals, all_labels, num_classes, k, sigma))
    return torch.cat(out)


def knn_top1(queries: torch.Tensor, query_labels: torch.Tensor, ref_feats: torch.Tensor, ref_labels: torch.Tensor,
             num_classes: int, k: int = 200, sigma: float = 0.07, comm: Comm | None = None) -> float:
    """Top-1 accuracy (fraction in 0..1) of weighted kNN (references sharded over the ranks of `comm`)."""
    votes = knn_predict(queries, ref_feats, ref_labels, num_classes, k, sigma, comm=comm)
    return (votes.argmax(1).cpu() == query_labels.cpu()).float().mean().item()


@torch.no_grad()
def knn_correct(queries: torch.Tensor, query_labels: torch.Tensor, ref_feats: torch.Tensor,
                ref_labels: torch.Tensor, num_classes: int, k: int = 200, sigma: float = 0.07, chunk: int = 1024,
                comm: Comm | None = None) -> tuple[int, int]:
    """(correct, total) of weighted kNN over every rank's queries: queries AND references sharded over `comm`.

    Each round every rank contributes up to `chunk` of its own queries; all of them are gathered, every rank
    finds its local top-K of each against its reference shard and sends rank r the candidates of rank r's
    queries (all_to_all), where the K x W candidates are merged into the exact global top-K and voted on. The
    counts are summed over the ranks. Each rank compares every query with its shard only: Q x N / W work.
    """
    comm = comm or Comm()
    device = ref_feats.device
    rounds = int(comm.max(torch.tensor([-(-queries.shape[0] // chunk)], device=device)).item())
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(rounds):
        q = queries[i * chunk : (i + 1) * chunk].to(device)
        mine = q.shape[0]
        q = torch.nn.functional.pad(q, (0, 0, 0, chunk - mine))  # every rank sends `chunk` rows
        vals, labels = _local_topk(comm.gather_rows(q), ref_feats, ref_labels, k)
        # row block r of vals holds rank r's queries: send it there; receive every rank's candidates for ours
        got_vals = comm.all_to_all_rows(vals).view(comm.world, chunk, k).permute(1, 0, 2).reshape(chunk, -1)
        got_labels = comm.all_to_all_rows(labels).view(comm.world, chunk, k).permute(1, 0, 2).reshape(chunk, -1)
        votes = _vote(got_vals[:mine], got_labels[:mine], num_classes, k, sigma)
        correct += (votes.argmax(1) == query_labels[i * chunk : (i + 1) * chunk].to(device)).sum()
    counts = torch.stack([correct, torch.tensor(queries.shape[0], device=device)])
    if comm.world > 1:
        comm.all_reduce_(counts)
    return int(counts[0].item()), int(counts[1].item())
