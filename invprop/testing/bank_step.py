"""One InvP step over W ranks against the dense reference, with its collectives counted, then a save and a
resume at another world size: the bank half of `tools/scale_check.py` and `tools/bench_collectives.py --counted`.

The shapes are ImageNet's recipe (D 128, M 4096, k 4, 3 layers = 84 candidates, P 50) with a smaller bank and a
small per-rank batch `b`, so 64 ranks fit in one machine. Every collective's payload is proportional to the
per-rank batch (Q = W b rows, or b rows gathered), so bytes at batch 256 are the counted bytes x 256 / b; the
packed pair scores' padding (the largest owner's count) makes that slightly pessimistic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from invprop import checkpoint, distributed
from invprop.bank import ShardedBank
from invprop.collectives import TRAFFIC
from invprop.graph import NeighbourGraph
from invprop.loss import InvPLoss
from invprop.testing.dense_reference import DenseInvP
from invprop.testing.forked_ranks import private_rss_mb


@dataclass(frozen=True)
class StepShape:
    rows: int = 65536
    dim: int = 128
    batch: int = 4  # per rank
    m: int = 4096
    k: int = 4
    layers: int = 3
    p: int = 50
    tau: float = 0.2
    lam: float = 0.6
    momentum: float = 0.5


@dataclass
class Problem:
    """Inputs and the dense reference's results, built in the parent before the ranks fork (shared pages)."""

    shape: StepShape
    world: int
    z: torch.Tensor
    ids: torch.Tensor
    table: torch.Tensor
    loss: float
    grad: torch.Tensor
    bank_after: torch.Tensor
    table_after: torch.Tensor


def _criterion(shape: StepShape) -> dict[str, Any]:
    return dict(tau=shape.tau, n_background=shape.m, n_pos=shape.p, layers=shape.layers, lambda_inv=shape.lam,
                warmup_epochs=0, bank_momentum=shape.momentum)


def build_problem(shape: StepShape, world: int, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    q = world * shape.batch
    z = torch.nn.functional.normalize(torch.randn(q, shape.dim, generator=gen), dim=1)
    ids = torch.randperm(shape.rows, generator=gen)[:q]
    table = torch.randint(0, shape.rows, (shape.rows, shape.k), generator=gen, dtype=torch.int32)
    bank = ShardedBank(shape.rows, shape.dim, seed=3).rows.clone()
    dense = DenseInvP(bank, table.clone().long(), **_criterion(shape))
    zr = z.clone().requires_grad_()
    out = dense(zr, ids, epoch=1)
    out.loss.backward()
    dense.commit(out)
    return Problem(shape, world, z, ids, table, out.loss.item(), zr.grad.clone(), dense.bank.clone(),
                   dense.table.clone())


def step_rank(rank: int, world: int, problem: Problem, ckpt_dir: str) -> dict[str, Any]:
    """One sharded step on this rank's slice, compared with the reference; counted bytes; a timed save."""
    shape = problem.shape
    comm = distributed.init(distributed.read_env(), timeout_s=300)
    try:
        bank = ShardedBank(shape.rows, shape.dim, comm=comm, seed=3)
        graph = NeighbourGraph(shape.rows, shape.k)
        graph.table[:] = problem.table.to(graph.table.dtype)
        crit = InvPLoss(bank, graph, **_criterion(shape))
        lo, hi = rank * shape.batch, (rank + 1) * shape.batch
        z = problem.z[lo:hi].clone().requires_grad_()
        comm.barrier()
        TRAFFIC.reset()
        start = time.perf_counter()
        out = crit(z, problem.ids[lo:hi], epoch=1)
        out.loss.backward()
        crit.commit(out)
        step_s = time.perf_counter() - start
        sent = dict(TRAFFIC.sent)
        calls = dict(TRAFFIC.calls)
        errors = {
            "loss": abs(out.stats["loss"] - problem.loss),
            "grad": (z.grad - problem.grad[lo:hi]).abs().max().item(),
            "bank_rows": (bank.rows - problem.bank_after[bank.start:bank.stop]).abs().max().item(),
            "graph_equal": bool(torch.equal(graph.table.long(), problem.table_after.long())),
        }
        start = time.perf_counter()
        checkpoint.save(Path(ckpt_dir), 1, {"bank": bank, "graph": graph}, comm=comm)
        save_s = time.perf_counter() - start
        return {"errors": errors, "sent_bytes": sent, "calls": calls, "step_s": step_s, "save_s": save_s,
                "private_rss_mb": private_rss_mb(), "local_candidates": bank.last_candidates}
    finally:
        distributed.shutdown()


def resume_rank(rank: int, world: int, problem: Problem, ckpt_dir: str) -> dict[str, Any]:
    """A resume at this world size from the checkpoint `step_rank` saved: rows equal, bytes read."""
    shape = problem.shape
    comm = distributed.init(distributed.read_env(), timeout_s=300)
    try:
        bank = ShardedBank(shape.rows, shape.dim, comm=comm, seed=99)  # other rows until loaded
        graph = NeighbourGraph(shape.rows, shape.k)
        before = checkpoint.IO.bytes_read
        start = time.perf_counter()
        found = checkpoint.latest(Path(ckpt_dir), report=rank == 0, states={"bank": bank, "graph": graph},
                                  comm=comm)
        checkpoint.load(found, {"bank": bank, "graph": graph})
        return {"rows_equal": bool(torch.equal(bank.rows, problem.bank_after[bank.start:bank.stop])),
                "graph_equal": bool(torch.equal(graph.table.long(), problem.table_after.long())),
                "load_s": time.perf_counter() - start, "bytes_read": checkpoint.IO.bytes_read - before}
    finally:
        distributed.shutdown()
