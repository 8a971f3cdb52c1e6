"""Collective costs on this machine (gloo, W = 1..8 processes) and the InvP step's communication by rank count.

    python tools/bench_collectives.py --worlds 1,2,4,8 --out docs/results/collectives_gloo.json
    python tools/bench_collectives.py --model-only          # the byte table of docs/SCALING.md, no measurement
    python tools/bench_collectives.py --counted 8,16,64 --out docs/results/collectives_counted.json
        # bytes each rank sends in one real InvP step (forked ranks, every collective call counted) vs the model

Measures the median time of all_gather and all_reduce of float32 payloads of a few sizes per rank, fits
t = alpha + bytes / bandwidth per (operation, W) with the ring algorithm's bytes per rank ((W-1) S for an
all_gather of S per rank, 2 (W-1)/W S for an all_reduce of S), and writes both, with the byte model of one
InvP step (`step_collectives`), to one JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (4 << 10, 64 << 10, 1 << 20, 8 << 20)  # bytes per rank


def step_collectives(world: int, batch: int = 256, dim: int = 128, k: int = 4, cands: int = 84,
                     params: int = 25_557_032) -> list[dict]:
    """Every collective of one InvP training step (invprop/loss.py, bank, DDP) with its payload in bytes
    (`bytes`: the input per rank of an all_gather, the tensor of an all_reduce, the whole input of a
    reduce_scatter or an all_to_all). Q = world x batch gathered queries; the defaults are ImageNet's recipe:
    D 128, k 4 neighbours, 3 propagation layers (84 candidates), ResNet-50 (25.6M float32 gradients). The pair
    scores travel packed by owner (about Q (1 + C) / W per rank; `--counted` measures the padding)."""
    q = world * batch
    pairs = -(-q * (1 + cands) // world)
    rows = [
        ("forward", "all_gather", "embeddings z (batch x D float32)", batch * dim * 4, 1),
        ("forward", "all_gather", "bank ids (batch int64)", batch * 8, 1),
        ("forward", "all_reduce", "exact M-th score: radix histograms (Q x 16 int32), 8 rounds", q * 16 * 4, 8),
        ("forward", "all_reduce", "logsumexp across ranks: max and sum (Q float32), 2 terms", q * 4, 4),
        ("forward", "all_reduce", "narrow selection: the queries to select again (Q int32)", q * 4,
         1 if world > 2 else 0),
        ("forward", "all_gather", "pair scores, packed by owner (~Q (1 + C) / W float32)", pairs * 4, 1),
        ("forward", "all_to_all", "graph update: local top-(k+1) values and ids to each query's rank",
         q * (k + 1) * 12, 1),
        ("forward", "all_gather", "graph update: each rank's picks (batch x k int64)", batch * k * 8, 1),
        ("backward", "reduce_scatter", "gradient of the gathered z (Q x D float32)", q * dim * 4, 1),
        ("backward", "reduce_scatter", "gradient of the packed pair scores (W x ~Q (1 + C) / W)", world * pairs * 4, 1),
        ("backward", "all_reduce", "gradient of the logsumexp sums (Q float32), 2 terms", q * 4, 2),
        ("backward", "all_reduce", "DDP: backbone gradients (float32)", params * 4, 1),
    ]
    return [{"phase": p, "op": op, "what": what, "bytes": b, "calls": calls} for p, op, what, b, calls in rows]


def ring_bytes(op: str, payload: int, world: int) -> float:
    """Bytes each rank sends in the ring algorithm (NCCL's for large messages); the same formulas as the
    counter of real calls (invprop.collectives.TRAFFIC)."""
    if world == 1:
        return 0.0
    if op == "all_gather":
        return (world - 1) * payload
    if op in ("reduce_scatter", "all_to_all"):
        return (world - 1) / world * payload
    return 2.0 * (world - 1) / world * payload


def bank_sent_mb(world: int, **kw) -> float:
    """The model's bank bytes sent per rank per step, MB (DDP excluded)."""
    return sum(c["calls"] * ring_bytes(c["op"], c["bytes"], world) for c in step_collectives(world, **kw)
               if not c["what"].startswith("DDP")) / 1e6


def counted(worlds: list[int], batch: int) -> dict:
    """Bytes sent per rank in one real InvP step at each W (forked ranks, counted per call), scaled to batch 256
    per rank, beside the model's."""
    from invprop.testing.bank_step import StepShape, build_problem, step_rank
    from invprop.testing.forked_ranks import run_forked

    found = {}
    for world in worlds:
        shape = StepShape(batch=batch)
        with tempfile.TemporaryDirectory() as ckpt:
            steps = run_forked(step_rank, world, (build_problem(shape, world), ckpt))
        scale = 256 / batch
        found[str(world)] = {"counted_mb": max(sum(r["sent_bytes"].values()) for r in steps) * scale / 1e6,
                             "model_mb": bank_sent_mb(world),
                             "calls": steps[0]["calls"],
                             "max_grad_error_vs_dense": max(r["errors"]["grad"] for r in steps)}
    return found


def memory_per_rank(world: int, n: int = 1_281_167, dim: int = 128, k: int = 4, batch: int = 256,
                    m: int = 4096) -> dict:
    """Bytes each rank holds for the bank: its float32 shard and float16 mirror, the replicated int32 neighbour
    table, and the selection's output: every gathered query's first, narrow candidates (about 2M / W scores
    and ids a query; `ShardedBank.narrow_width`), queries selected again in full not counted."""
    shard = -(-n // world)
    q = world * batch
    width = min(max(k + 1, -(-2 * m // world)), m, shard) if world > 2 else min(m, shard)
    return {"bank_shard_float32": shard * dim * 4, "bank_mirror_float16": shard * dim * 2,
            "neighbour_table_int32": n * k * 4, "local_top_m": q * width * 12}


def model_ms(world: int, alpha_ms: float, gb_s: float, **kw) -> dict:
    """Communication time of one step, t = sum(calls x (alpha + ring bytes / bandwidth)), bank-only and with DDP."""
    bank = ddp = 0.0
    for c in step_collectives(world, **kw):
        t = c["calls"] * (alpha_ms + ring_bytes(c["op"], c["bytes"], world) / (gb_s * 1e9) * 1e3) if world > 1 else 0
        if c["what"].startswith("DDP"):
            ddp += t
        else:
            bank += t
    return {"bank_ms": bank, "ddp_ms": ddp}


def _worker(rank: int, world: int, out: str, reps: int, clock: Callable[[], float] = time.perf_counter) -> None:
    import torch
    import torch.distributed as dist

    from invprop import distributed

    distributed.init(distributed.read_env(), timeout_s=120)
    found: dict = {}
    for op in ("all_gather", "all_reduce"):
        for size in SIZES:
            x = torch.ones(size // 4)
            parts = [torch.empty_like(x) for _ in range(world)]

            def call(x=x, op=op, parts=parts) -> None:
                if world == 1:
                    x.clone()  # no collective: a copy, what the identity path costs at most
                elif op == "all_gather":
                    dist.all_gather(parts, x)
                else:
                    dist.all_reduce(x)

            times = []
            for i in range(reps + 2):
                if world > 1:
                    dist.barrier()
                start = clock()
                call()
                if i >= 2:
                    times.append(clock() - start)
            found.setdefault(op, {})[str(size)] = sorted(times)[len(times) // 2] * 1000
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    distributed.shutdown()


def fit(times_ms: dict, op: str, world: int) -> dict:
    """Least-squares alpha (ms) and bandwidth (GB/s) of t = alpha + ring bytes / bandwidth."""
    xs = [ring_bytes(op, int(s), world) for s in times_ms]
    ys = list(times_ms.values())
    if world == 1 or len(xs) < 2:
        return {"alpha_ms": min(ys), "gb_s": None}
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"alpha_ms": my - slope * mx, "gb_s": 1.0 / (slope * 1e6) if slope > 0 else None}


def measure(worlds: list[int], reps: int, tmp: Path, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median ms per (op, payload) at each W and its fit; `clock` (seconds, picklable: the ranks are spawned) is
    injectable so a test can check the bookkeeping with deterministic timings."""
    from invprop.jobs.spawn import spawn_ranks

    found = {}
    for world in worlds:
        out = tmp / f"w{world}.json"
        spawn_ranks(_worker, world, (str(out), reps, clock), timeout_s=600)
        times = json.loads(out.read_text())
        found[str(world)] = {op: {"ms": t, **fit(t, op, world)} for op, t in times.items()}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--counted", default="", help="W list: count the bytes of a real step at each W")
    parser.add_argument("--counted-batch", type=int, default=4, help="per-rank batch of the counted step")
    args = parser.parse_args()
    if args.counted:
        found = counted([int(w) for w in args.counted.split(",")], args.counted_batch)
        for world in (256,):
            found.setdefault(str(world), {"model_mb": bank_sent_mb(world)})
        text = json.dumps(found, indent=1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        print(text)
        return 0
    summary: dict = {"cpus": os.cpu_count(), "sizes_bytes": list(SIZES),
                     "step_bytes": {w: step_collectives(w) for w in (8, 16, 64, 256)},
                     "memory_per_rank": {w: memory_per_rank(w) for w in (8, 16, 64, 256)}}
    if not args.model_only:
        with tempfile.TemporaryDirectory() as tmp:
            summary["gloo"] = measure([int(w) for w in args.worlds.split(",")], args.reps, Path(tmp))
    text = json.dumps(summary, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        part = args.out.with_suffix(".tmp")
        part.write_text(text)
        part.replace(args.out)
    print(json.dumps(summary.get("gloo", {}), indent=1) if not args.model_only else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
