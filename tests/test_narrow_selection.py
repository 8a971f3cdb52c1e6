"""The narrow first selection of the sharded bank (about 2M / W scores per query and rank): exact against the
dense single-process step both when it suffices and when a shard holds more of a query's top-M than it kept
(those queries are selected again in full), and the candidates a rank holds stay near 2 x batch x M."""

from __future__ import annotations

import pytest
import torch

from invprop import distributed
from invprop.bank import ShardedBank
from invprop.graph import NeighbourGraph
from invprop.jobs.spawn import spawn_ranks
from invprop.loss import InvPLoss
from invprop.testing.dense_reference import DenseInvP

pytestmark = pytest.mark.timeout(180)
N, D, W, B, M, K = 400, 16, 4, 6, 60, 3
SETTINGS = dict(tau=0.1, n_background=M, n_pos=5, layers=2, lambda_inv=0.6, warmup_epochs=0, bank_momentum=0.5)


def _problem(clustered: bool, denominator: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    rows = torch.nn.functional.normalize(torch.randn(N, D, generator=gen), dim=1)
    z = torch.nn.functional.normalize(torch.randn(W * B, D, generator=gen), dim=1)
    if clustered:  # shard 0 (rows 0..99) sits around the queries: every query's top-60 is all in it
        base = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
        rows[:100] = torch.nn.functional.normalize(base + 0.05 * torch.randn(100, D, generator=gen), dim=1)
        z = torch.nn.functional.normalize(base + 0.05 * torch.randn(W * B, D, generator=gen), dim=1)
    ids = torch.randperm(N, generator=gen)[: W * B]
    table = torch.randint(0, N, (N, K), generator=gen)
    dense = DenseInvP(rows.clone(), table.clone(), denominator=denominator, **SETTINGS)
    zr = z.clone().requires_grad_()
    out = dense(zr, ids, epoch=1)
    out.loss.backward()
    return {"rows": rows, "z": z, "ids": ids, "table": table, "loss": out.loss.item(), "grad": zr.grad,
            "neighbours": out.neighbours, "denominator": denominator}


def _rank(rank: int, world: int, problem: dict, out_dir: str) -> None:
    comm = distributed.init(distributed.read_env(), timeout_s=60)
    try:
        bank = ShardedBank(N, D, comm=comm, selection="topk")
        bank.load_state_dict({"rows": problem["rows"][bank.start:bank.stop].clone(), "start": bank.start, "n": N})
        graph = NeighbourGraph(N, K)
        graph.table[:] = problem["table"].to(graph.table.dtype)
        crit = InvPLoss(bank, graph, denominator=problem["denominator"], **SETTINGS)
        z = problem["z"][rank * B:(rank + 1) * B].clone().requires_grad_()
        out = crit(z, problem["ids"][rank * B:(rank + 1) * B], epoch=1)
        out.loss.backward()
        top = bank.global_top(problem["z"], M, keep=K + 1)
        torch.save({"loss": out.stats["loss"], "grad": z.grad, "neighbours": out.neighbours,
                    "redone": 0 if top.redo_rows is None else int(top.redo_rows.numel()),
                    "main_width": top.vals.shape[1], "candidates": bank.last_candidates}, f"{out_dir}/{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.parametrize(("clustered", "denominator"), [(False, "code"), (True, "code"), (True, "paper")])
def test_narrow_selection_equals_the_dense_step(clustered: bool, denominator: str, tmp_path) -> None:
    problem = _problem(clustered, denominator)
    spawn_ranks(_rank, W, (problem, str(tmp_path)), timeout_s=150)
    found = [torch.load(tmp_path / f"{r}.pt") for r in range(W)]
    for got in found:
        assert got["loss"] == pytest.approx(problem["loss"], rel=1e-5, abs=1e-6)
        assert torch.equal(got["neighbours"].long(), problem["neighbours"].long())
        assert got["main_width"] == 2 * M // W  # the first selection keeps 30 of each shard's 100 rows
    torch.testing.assert_close(torch.cat([g["grad"] for g in found]), problem["grad"], rtol=1e-4, atol=1e-6)
    if clustered:  # shard 0 held all 60 of every query's top-M: every query was selected again in full
        assert all(g["redone"] == W * B for g in found)
    else:  # spread rows: the narrow selection sufficed, 2 x batch x M candidates per rank
        assert all(g["redone"] == 0 and g["candidates"] == 2 * B * M for g in found)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_w32_forked_step_equals_dense_then_resumes_at_w16(tmp_path) -> None:
    """The scale check's bank part at W = 32 (tools/scale_check.py runs 64 and 128): ImageNet's M, D, k, l, P on
    32 forked ranks, one step equal to the dense reference, a committed save, a resume at 16 ranks. In a fresh
    interpreter: ranks forked from a process whose autograd engine has started threads cannot run backward."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(root / "tools/scale_check.py"), "--out", str(out), "--parts", "bank",
                           "--world", "32", "--resume-world", "16", "--batch", "2", "--rows", "32768"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())["bank"]
    equal = found["step_equal_to_dense"]
    assert equal["max_loss_error"] < 1e-5 and equal["max_grad_error"] < 1e-6 and equal["max_bank_row_error"] == 0
    assert equal["graph_equal_on_every_rank"]
    assert found["resume"]["rows_equal_on_every_rank"] and found["resume"]["graph_equal_on_every_rank"]
    assert found["local_candidates_per_rank_at_batch_256"] == 2 * 256 * 4096
