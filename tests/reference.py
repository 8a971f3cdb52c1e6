"""A plain, independent dense reference of docs/DESIGN.md, "The algorithm": full N x D bank, one anchor at a time."""

from __future__ import annotations

from collections import deque

import torch


def concat_candidates(graph: torch.Tensor, a: int, layers: int) -> list[int]:
    out, frontier = [], [a]
    for _ in range(layers):
        nxt = []
        for node in frontier:
            for j in graph[node].tolist() if node >= 0 else [-1] * graph.shape[1]:
                nxt.append(j)
        out.extend(nxt)
        frontier = nxt
    return out


def bfs_candidates(graph: torch.Tensor, a: int, layers: int) -> list[int]:
    dist = {a: 0}
    queue = deque([a])
    while queue:
        node = queue.popleft()
        if dist[node] == layers:
            continue
        for j in graph[node].tolist():
            if j >= 0 and j not in dist:
                dist[j] = dist[node] + 1
                queue.append(j)
    return sorted(j for j in dist if j != a)


def reference_step(z, ids, bank, graph, *, tau, m, p, layers, lam, w, propagation="concat",
                   positives="hard", denominator="code"):
    """Loss (mean over anchors) plus new graph rows and positives; z must require grad."""
    n = bank.shape[0]
    m = min(m, n)
    losses, new_rows, chosen = [], [], []
    for q in range(z.shape[0]):
        a = int(ids[q])
        s = bank @ z[q]
        top = torch.argsort(s.detach(), descending=True)[:m].tolist()
        l_ins = torch.logsumexp(s[top] / tau, 0) - s[a] / tau
        cands = concat_candidates(graph, a, layers) if propagation == "concat" else bfs_candidates(graph, a, layers)
        valid = [c for c in cands if c >= 0]
        order = sorted(range(len(valid)), key=lambda c: float(s.detach()[valid[c]]), reverse=positives == "easy")
        hard = [valid[c] for c in order[:p]]
        chosen.append(sorted(hard))
        l_inv = torch.zeros(())
        if hard:
            num = torch.logsumexp(s[hard] / tau, 0)
            if denominator == "code":
                den = torch.logsumexp(s[[j for j in top if j != a]] / tau, 0)
            else:
                cset = set(valid)
                den = torch.logsumexp(torch.cat([s[[j for j in top if j not in cset]], s[hard]]) / tau, 0)
            l_inv = den - num
        losses.append(l_ins + lam * w * l_inv)
        s_nb = s.detach().clone()
        s_nb[a] = float("-inf")
        new_rows.append(torch.argsort(s_nb, descending=True)[: graph.shape[1]])
    return torch.stack(losses).mean(), torch.stack(new_rows), chosen


def reference_npid(z, ids, bank, tau):
    s = z @ bank.t()
    return (torch.logsumexp(s / tau, 1) - s[torch.arange(len(ids)), ids] / tau).mean()


def reference_bank_update(bank, ids, z, momentum):
    out = bank.clone()
    for q, a in enumerate(ids.tolist()):
        out[a] = torch.nn.functional.normalize(momentum * bank[a] + (1 - momentum) * z[q].detach(), dim=0)
    return out
