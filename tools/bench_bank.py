#!/usr/bin/env python
"""Per-step cost of the bank work of an InvP step, sharded implementation at W=1 vs the dense reference.

The bank work is everything the loss does besides the network: scores against the bank, the exact global
top-M, candidates from the neighbour table, hard positives, the loss and its backward to the embeddings, then
the graph and bank updates. Both sides run on this machine in this process, on the same bank, neighbour table
and inputs:

* ``sharded``: ``invprop.loss.InvPLoss`` over a ``ShardedBank`` at world size 1 (no process group), i.e. the
  code every rank runs in training;
* ``dense``: ``invprop.testing.dense_reference.DenseInvP``, a vectorised single-process implementation on the full
  N x D bank (``torch.topk`` over the whole score matrix).

A step is: forward of the loss for fixed random L2-normalised embeddings (requires_grad), backward to the
embeddings, graph + bank update. The two sides alternate step by step (so machine noise hits both alike);
``--warmup`` steps are dropped, then the median over ``--steps`` is reported (at most 3 steps for N >= 1M).
``ratio_vs_dense`` = sharded / dense (goal: <= 1.0).

Memory: ``bank_bytes_per_rank`` is ``ShardedBank(N, D, comm=Comm(r, W)).rows.nbytes`` (the largest over the
ranks; N*D*4/W when W divides N) for W = 1, 2, 4, 8; ``graph_bytes`` is the int32 neighbour table (N x k x 4),
replicated on every rank.

Usage::

    python tools/bench_bank.py                          # N = 10k, 100k, 1.28M; rich table
    python tools/bench_bank.py --json                   # exactly one JSON object on stdout
    python tools/bench_bank.py --sizes 60000 --batch 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from invprop.bank import SELECTIONS, ShardedBank  # noqa: E402
from invprop.collectives import Comm  # noqa: E402
from invprop.graph import NeighbourGraph  # noqa: E402
from invprop.loss import InvPLoss  # noqa: E402
from invprop.testing.dense_reference import DenseInvP  # noqa: E402

WORLDS = (1, 2, 4, 8)
LARGE_N, LARGE_STEPS = 1_000_000, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                    default=[10_000, 100_000, 1_280_000], help="comma-separated bank sizes N")
    ap.add_argument("--steps", type=int, default=10, help=f"timed steps per size (at most {LARGE_STEPS} for N >= 1M)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--m", type=int, default=4096, help="background set size M")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="neighbours per row of the graph")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--pos", type=int, default=50, help="hard positives P")
    ap.add_argument("--tau", type=float, default=0.07)
    ap.add_argument("--denominator", choices=("code", "paper"), default="code")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stabler timings)")
    ap.add_argument("--device", default="cpu", help="where bank, table and embeddings live (cpu, cuda)")
    ap.add_argument("--selection", default="auto", choices=SELECTIONS, help="the sharded side's top-M selection")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile one more step of each side and print the top ops to stderr")
    return ap.parse_args(argv)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bank_bytes_per_rank(n: int, dim: int) -> dict[str, int]:
    """Largest ShardedBank(...).rows.nbytes over the ranks of each world size."""
    out = {}
    for world in WORLDS:
        out[str(world)] = max(ShardedBank(n, dim, comm=Comm(r, world)).rows.nbytes for r in range(world))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(crit, z0: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float]:
    z = z0.clone().requires_grad_()
    _sync(z.device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = crit(z, ids, epoch=1)
    out.loss.backward()
    crit.commit(out)
    _sync(z.device)
    return time.perf_counter() - wall, time.process_time() - cpu, out.stats["loss"]


def bench_size(n: int, args: argparse.Namespace) -> dict:
    steps = min(args.steps, LARGE_STEPS) if n >= LARGE_N else args.steps
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    rows = ShardedBank(n, args.dim, seed=args.seed).rows.to(device)
    table = torch.randint(0, n, (n, args.k), generator=gen, dtype=torch.int32).to(device)
    hyper = dict(tau=args.tau, n_background=args.m, n_pos=args.pos, layers=args.layers, lambda_inv=0.6,
                 warmup_epochs=0, denominator=args.denominator)

    bank = ShardedBank(n, args.dim, seed=args.seed, device=device, selection=args.selection)
    bank.rows = rows
    graph = NeighbourGraph(n, args.k, device=device)
    graph.table.copy_(table)
    sharded = InvPLoss(bank, graph, **hyper)
    dense = DenseInvP(rows.clone(), table.clone(), **hyper)

    batch = min(args.batch, n)
    times: dict[str, list[tuple[float, float]]] = {"dense": [], "sharded": []}
    rel_diff = 0.0
    for i in range(args.warmup + steps):
        z0 = torch.nn.functional.normalize(torch.randn(batch, args.dim, generator=gen), dim=1).to(device)
        ids = torch.randperm(n, generator=gen)[:batch].to(device)
        order = ("dense", "sharded") if i % 2 == 0 else ("sharded", "dense")
        losses = {}
        for name in order:
            wall, cpu, losses[name] = _step(dense if name == "dense" else sharded, z0, ids)
            if i >= args.warmup:
                times[name].append((wall, cpu))
        rel_diff = max(rel_diff, abs(losses["sharded"] - losses["dense"]) / max(abs(losses["dense"]), 1e-12))

    def median_ms(name: str, which: int) -> float:
        return statistics.median(t[which] for t in times[name]) * 1e3

    if args.profile:
        _profile(n, {"dense": dense, "sharded": sharded}, z0, ids)
    dense_ms, sharded_ms = median_ms("dense", 0), median_ms("sharded", 0)
    result = {
        "dense_ms": round(dense_ms, 2),
        "sharded_ms": round(sharded_ms, 2),
        "ratio_vs_dense": round(sharded_ms / dense_ms, 4),
        "bank_bytes_per_rank": bank_bytes_per_rank(n, args.dim),
        "graph_bytes": graph.table.nbytes,
        "dense_cpu_ms": round(median_ms("dense", 1), 2),
        "sharded_cpu_ms": round(median_ms("sharded", 1), 2),
        "steps": steps,
        "loss_rel_diff": rel_diff,
    }
    del sharded, dense, bank, graph, rows
    return result


def _profile(n: int, crits: dict, z0: torch.Tensor, ids: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if z0.device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if z0.device.type == "cuda" else "self_cpu_time_total"
    for name, crit in crits.items():
        with profile(activities=activities) as prof:
            _step(crit, z0, ids)
        print(f"--- N={n} {name}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=sort_by, row_limit=15), file=sys.stderr)


def _mb(x: int) -> str:
    return f"{x / 2**20:,.1f} MiB"


def print_table(report: dict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bank work per step on {report['device']}: batch {args.batch}, D={args.dim}, M={args.m}, "
                        f"k={args.k}, l={args.layers}, P={args.pos}, {report['threads']} thread(s)")
    for col in ("N", "dense ms", "sharded W=1 ms", "ratio", *(f"bank/rank W={w}" for w in WORLDS), "graph (repl.)",
                "steps", "loss rel diff"):
        table.add_column(col, justify="right")
    for n, r in report["sizes"].items():
        table.add_row(f"{int(n):,}", f"{r['dense_ms']:.1f}", f"{r['sharded_ms']:.1f}", f"{r['ratio_vs_dense']:.3f}",
                      *(_mb(r["bank_bytes_per_rank"][str(w)]) for w in WORLDS), _mb(r["graph_bytes"]),
                      str(r["steps"]), f"{r['loss_rel_diff']:.1e}")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    console.print(f"machine: {report['machine']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report = {"sizes": {str(n): bench_size(n, args) for n in args.sizes}, "threads": torch.get_num_threads(),
              "machine": machine(), "device": _device_name(torch.device(args.device)), "selection": args.selection,
              "batch": args.batch, "m": args.m, "dim": args.dim}
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
