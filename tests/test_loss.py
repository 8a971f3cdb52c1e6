"""Single-process checks of docs/DESIGN.md, "The algorithm", against the plain reference and hand-worked graphs."""

from __future__ import annotations

import math

import pytest
import torch
from reference import bfs_candidates, reference_step

from invprop.bank import ShardedBank, init_rows
from invprop.graph import UNKNOWN, NeighbourGraph
from invprop.loss import InvPLoss, warmup_weight


def _graph(rows: list[list[int]]) -> NeighbourGraph:
    g = NeighbourGraph(len(rows), len(rows[0]))
    g.table[:] = torch.tensor(rows, dtype=torch.int32)
    return g


# 0 -> 1, 2 ; 1 -> 0, 3 ; 2 -> 3, 3 ; 3 -> 4, -1 ; 4 unknown
HAND = [[1, 2], [0, 3], [3, 3], [4, -1], [-1, -1]]


def test_concat_keeps_duplicates_and_layers_in_order() -> None:
    cands = _graph(HAND).candidates(torch.tensor([0]), layers=2, mode="concat")[0].tolist()
    # layer 1 = G[0] = [1, 2]; layer 2 = G[1] + G[2] = [0, 3, 3, 3]
    assert cands == [1, 2, 0, 3, 3, 3]


def test_concat_marks_children_of_unknown_as_unknown() -> None:
    cands = _graph(HAND).candidates(torch.tensor([3]), layers=2, mode="concat")[0].tolist()
    assert cands == [4, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN]


def test_bfs_is_distinct_nodes_within_distance_excluding_self() -> None:
    g = _graph(HAND)
    for anchor, layers, expected in [(0, 1, {1, 2}), (0, 2, {1, 2, 3}), (0, 3, {1, 2, 3, 4}), (4, 3, set())]:
        got = {c for c in g.candidates(torch.tensor([anchor]), layers, "bfs")[0].tolist() if c != UNKNOWN}
        assert got == expected
        assert got == set(bfs_candidates(g.table.long(), anchor, layers))


def test_mutual_edges_drop_one_way_neighbours_at_every_layer() -> None:
    # HAND's two-way edges: 0 <-> 1 only (2 -> 3 and 3 -> 4 are one-way, 0 -> 2 too: 2 does not list 0)
    g = _graph(HAND)
    assert g.candidates(torch.tensor([0]), 2, "concat", mutual=True)[0].tolist() == [1, UNKNOWN, 0] + [UNKNOWN] * 3
    assert g.candidates(torch.tensor([2]), 2, "concat", mutual=True)[0].tolist() == [UNKNOWN] * 6
    ring = _graph([[1, 3], [2, 0], [3, 1], [0, 2]])  # every edge two-way: mutual changes nothing
    for anchor in range(4):
        a = torch.tensor([anchor])
        assert torch.equal(ring.candidates(a, 3, "concat", mutual=True), ring.candidates(a, 3, "concat"))


def test_concat_and_bfs_differ_where_paths_repeat() -> None:
    g = _graph(HAND)
    concat = [c for c in g.candidates(torch.tensor([0]), 2, "concat")[0].tolist() if c != UNKNOWN]
    bfs = [c for c in g.candidates(torch.tensor([0]), 2, "bfs")[0].tolist() if c != UNKNOWN]
    assert sorted(concat) == [0, 1, 2, 3, 3, 3] and sorted(bfs) == [1, 2, 3]


def test_warmup_weight() -> None:
    assert [warmup_weight(e, 2) for e in range(4)] == [0.0, 0.0, 1.0, 1.0]


def test_hard_and_easy_positives_match_reference_sets() -> None:
    torch.manual_seed(0)
    n, d = 60, 8
    bank = ShardedBank(n, d, seed=2)
    graph = NeighbourGraph(n, 3)
    graph.table[:] = torch.randint(0, n, (n, 3), dtype=torch.int32)
    z = torch.nn.functional.normalize(torch.randn(6, d), dim=1)
    ids = torch.arange(6) * 7
    for positives in ("hard", "easy"):
        crit = InvPLoss(bank, graph, tau=0.1, n_background=20, n_pos=4, layers=2, lambda_inv=0.6,
                        warmup_epochs=0, propagation="bfs", positives=positives)
        out = crit(z, ids, epoch=0)
        _, _, chosen = reference_step(z.clone().requires_grad_(), ids, bank.rows, graph.table.long(), tau=0.1,
                                      m=20, p=4, layers=2, lam=0.6, w=1.0, propagation="bfs", positives=positives)
        got = [sorted(c for c in row.tolist() if c != UNKNOWN) for row in out.positives]
        assert got == chosen


def test_unknown_rows_give_no_invariance_term_and_lambda_zero_is_top_m_discrimination() -> None:
    torch.manual_seed(1)
    n, d = 50, 8
    bank, graph = ShardedBank(n, d, seed=1), NeighbourGraph(n, 4)  # every row unknown
    z = torch.nn.functional.normalize(torch.randn(5, d), dim=1)
    ids = torch.arange(5)
    with_inv = InvPLoss(bank, graph, tau=0.1, n_background=10, n_pos=3, layers=2, lambda_inv=0.6, warmup_epochs=0)
    no_inv = InvPLoss(bank, graph, tau=0.1, n_background=10, n_pos=3, layers=2, lambda_inv=0.0, warmup_epochs=0)
    a, b = with_inv(z, ids, 0), no_inv(z, ids, 0)
    assert a.stats["empty_candidates"] == 1.0
    assert a.loss.item() == pytest.approx(b.loss.item())
    s = z @ bank.rows.t() / 0.1
    top = s.topk(10, dim=1).values
    expected = (torch.logsumexp(top, 1) - s[torch.arange(5), ids]).mean()
    assert b.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def _lse(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _softmax_mean(xs: list[float], rows: list[tuple[float, float]]) -> tuple[float, float]:
    top = max(xs)
    w = [math.exp(x - top) for x in xs]
    return tuple(sum(wi * r[i] for wi, r in zip(w, rows, strict=True)) / sum(w) for i in (0, 1))


def test_log_space_gives_the_hand_computed_loss_at_tiny_temperature() -> None:
    """tau = 1e-3: the logits reach 1000 (exp overflows even in float64), the loss and its gradient must still equal
    the values worked out by hand, in float64 with the maximum taken out, on four rows of the unit circle."""
    tau, lam = 1e-3, 0.6
    angles = [0.0, 0.1, 0.2, math.pi / 2]
    rows = [(math.cos(a), math.sin(a)) for a in angles]
    bank, graph = ShardedBank(4, 2, seed=0), _graph([[2], [0], [0], [0]])  # 0 -> 2, 3 -> 0
    bank.rows = torch.tensor(rows, dtype=torch.float32)
    ids = [0, 3]
    z = torch.tensor([rows[0], rows[3]], dtype=torch.float32, requires_grad=True)  # each anchor on its own row
    out = InvPLoss(bank, graph, tau=tau, n_background=3, n_pos=1, layers=1, lambda_inv=lam,
                   warmup_epochs=0)(z, torch.tensor(ids), 0)
    out.loss.backward()

    losses, grads = [], []
    for anchor, positive in ((0, 2), (3, 0)):
        s = [rows[anchor][0] * r[0] + rows[anchor][1] * r[1] for r in rows]
        top = sorted(range(4), key=lambda j: -s[j])[:3]  # M = 3
        others = [j for j in top if j != anchor]  # the code's denominator: top-M without the anchor's own row
        l_ins = _lse([s[j] / tau for j in top]) - s[anchor] / tau
        l_inv = _lse([s[j] / tau for j in others]) - s[positive] / tau
        losses.append(l_ins + lam * l_inv)
        # d/dz: (softmax-weighted rows - own row) / tau, and lambda (softmax-weighted others - positive) / tau
        a = _softmax_mean([s[j] / tau for j in top], [rows[j] for j in top])
        b = _softmax_mean([s[j] / tau for j in others], [rows[j] for j in others])
        grads.append([((a[i] - rows[anchor][i]) + lam * (b[i] - rows[positive][i])) / tau / 2 for i in (0, 1)])
    assert losses[1] > 100  # exp(loss) overflows: only log space gets here
    assert out.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-5)
    torch.testing.assert_close(z.grad, torch.tensor(grads, dtype=torch.float32), rtol=1e-4, atol=1e-3)


def test_bank_init_range_and_not_normalised() -> None:
    rows = init_rows(0, 1000, 128, seed=0)
    bound = 1 / (128 / 3) ** 0.5
    assert rows.abs().max() <= bound and rows.abs().max() > 0.95 * bound
    assert not torch.allclose(rows.norm(dim=1), torch.ones(1000))


def test_own_row_share_counts_only_anchors_whose_row_is_in_top_m() -> None:
    n, d = 30, 4
    bank, graph = ShardedBank(n, d, seed=0), NeighbourGraph(n, 2)
    bank.rows = torch.nn.functional.normalize(bank.rows, dim=1)
    ids = torch.tensor([0, 1])
    z = torch.stack([bank.rows[0], -bank.rows[1]])  # anchor 0 sees its row first, anchor 1 last
    out = InvPLoss(bank, graph, tau=0.1, n_background=5, n_pos=1, layers=1, lambda_inv=0.6,
                   warmup_epochs=0)(z, ids, 0)
    assert out.stats["own_in_top_m"] == 0.5
    # the per-step monitors stay 0-d tensors (read only when a window is logged, not once per step)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.monitors.values())
    assert out.stats == {k: pytest.approx(float(v)) for k, v in out.monitors.items()}
