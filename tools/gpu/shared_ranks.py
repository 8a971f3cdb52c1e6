"""W ranks on one device against one rank: the sharded InvP step where ranks share a GPU.

NCCL refuses two ranks on one device, so `invprop.distributed.backend_for` gives them gloo, which stages CUDA
tensors through host memory. This part of the GPU check runs a few InvP steps (bank, kNN graph, L_ins + L_inv,
backward, momentum update) on W = 2 ranks of the same device and on one rank, from the same inputs, and reports
the largest differences: the sharded path on the GPU must give the single rank's values.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from invprop import distributed
from invprop.bank import ShardedBank, shard_bounds
from invprop.collectives import Comm
from invprop.graph import NeighbourGraph
from invprop.jobs.spawn import spawn_ranks
from invprop.loss import InvPLoss

# N divisible by neither 2 nor 3 (uneven shards); Q divisible by 1..4
N, D, Q, STEPS, M, P, K = 4099, 128, 96, 4, 512, 10, 4
TOLERANCE = 1e-4  # float32 sums in another order across ranks


def _inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    z = torch.nn.functional.normalize(torch.randn(Q, D, generator=gen), dim=1)
    return z, torch.randperm(N, generator=gen)[:Q]


def run_steps(comm: Comm) -> dict:
    """STEPS InvP steps over this rank's share of each batch; per step the loss, this rank's gradient rows;
    at the end this rank's bank rows and the graph rows it wrote."""
    device = comm.device
    bank = ShardedBank(N, D, comm=comm, seed=3)
    graph = NeighbourGraph(N, K, device)
    graph.table.copy_(torch.randint(0, N, (N, K), generator=torch.Generator().manual_seed(7)).int())
    crit = InvPLoss(bank, graph, tau=0.1, n_background=M, n_pos=P, layers=3, lambda_inv=0.6, warmup_epochs=0)
    share = Q // comm.world
    losses, grads = [], []
    for step in range(STEPS):
        z_all, ids_all = _inputs(step)
        part = slice(comm.rank * share, (comm.rank + 1) * share)
        z = z_all[part].to(device).requires_grad_()
        out = crit(z, ids_all[part].to(device), epoch=1)
        out.loss.backward()
        crit.commit(out)
        losses.append(float(out.stats["loss"]))
        grads.append(z.grad.cpu())
    return {"loss": losses, "grad": torch.cat(grads), "rows": bank.rows.cpu(), "graph": graph.table.cpu()}


def _rank(rank: int, world: int, out_dir: str) -> None:
    comm = distributed.init(distributed.read_env(), timeout_s=120)
    try:
        found = run_steps(comm)
        found["backend"], found["device"] = comm.backend, str(comm.device)
        torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def shared_device_check(world: int = 2) -> dict:
    """`world` ranks spawned on this machine (all on GPU 0 when there is one) against one rank in this process."""
    device = distributed.device_for(distributed.DistEnv())
    single = run_steps(Comm(device=device))
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_rank, world, (tmp,), timeout_s=300)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    share = Q // world
    grad_diff = rows_diff = loss_diff = 0.0
    for r, found in enumerate(ranks):
        # every rank reports the global loss; its gradient rows are its share of each step's batch
        loss_diff = max(loss_diff, max(abs(a - b) for a, b in zip(found["loss"], single["loss"], strict=True)))
        mine = torch.cat([single["grad"][s * Q + r * share: s * Q + (r + 1) * share] for s in range(STEPS)])
        grad_diff = max(grad_diff, (found["grad"] - mine).abs().max().item())
        lo, hi = shard_bounds(N, r, world)
        rows_diff = max(rows_diff, (found["rows"] - single["rows"][lo:hi]).abs().max().item())
    same_graph = all(torch.equal(found["graph"], single["graph"]) for found in ranks)
    return {"world": world, "backend": ranks[0]["backend"], "devices": sorted({f["device"] for f in ranks}),
            "rows": N, "batch": Q, "m": M, "steps": STEPS, "loss_max_diff": loss_diff, "grad_max_diff": grad_diff,
            "rows_max_diff": rows_diff, "same_graph": same_graph,
            "equal": same_graph and max(loss_diff, grad_diff, rows_diff) <= TOLERANCE}
