"""Collective costs on this machine (gloo, W = 1..8 processes) and the InvP step's communication by rank count.

    python tools/bench_collectives.py --worlds 1,2,4,8 --out docs/results/collectives_gloo.json
    python tools/bench_collectives.py --model-only          # the byte table of docs/SCALING.md, no measurement

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (4 << 10, 64 << 10, 1 << 20, 8 << 20)  # bytes per rank


def step_collectives(world: int, batch: int = 256, dim: int = 128, k: int = 4, cands: int = 84,
                     params: int = 25_557_032) -> list[dict]:
    """Every collective of one InvP training step (invprop/loss.py, bank, DDP) with its payload per rank in bytes
    (`bytes`: the input of an all_gather, the tensor of an all_reduce). Q = world x batch gathered queries; the
    defaults are ImageNet's recipe: D 128, k 4 neighbours, 3 propagation layers (84 candidates), ResNet-50
    (25.6M float32 gradients). Histograms of the radix select are int64 (Q x 256, four rounds)."""
    q = world * batch
    rows = [
        ("forward", "all_gather", "embeddings z (batch x D float32)", batch * dim * 4, 1),
        ("forward", "all_gather", "bank ids (batch int64)", batch * 8, 1),
        ("forward", "all_reduce", "exact M-th score: radix histograms (Q x 256 int64), 4 rounds", q * 256 * 8, 4),
        ("forward", "all_reduce", "logsumexp across ranks: max and sum (Q float32), 2 terms", q * 4, 4),
        ("forward", "all_reduce", "pair scores: self + candidates (Q x (1 + C) float32)", q * (1 + cands) * 4, 1),
        ("forward", "all_gather", "graph update: local top-(k+1) values and ids (Q x (k+1), 4 + 8 bytes)",
         q * (k + 1) * 12, 1),
        ("backward", "all_reduce", "gradient of the gathered z (Q x D float32)", q * dim * 4, 1),
        ("backward", "all_reduce", "gradient of the pair scores (Q x (1 + C) float32)", q * (1 + cands) * 4, 1),
        ("backward", "all_reduce", "gradient of the logsumexp sums (Q float32), 2 terms", q * 4, 2),
        ("backward", "all_reduce", "DDP: backbone gradients (float32)", params * 4, 1),
    ]
    return [{"phase": p, "op": op, "what": what, "bytes": b, "calls": calls} for p, op, what, b, calls in rows]


def ring_bytes(op: str, payload: int, world: int) -> float:
    """Bytes each rank sends in the ring algorithm (NCCL's for large messages)."""
    if world == 1:
        return 0.0
    return (world - 1) * payload if op == "all_gather" else 2.0 * (world - 1) / world * payload


def memory_per_rank(world: int, n: int = 1_281_167, dim: int = 128, k: int = 4, batch: int = 256,
                    m: int = 4096) -> dict:
    """Bytes each rank holds for the bank: its float32 shard and float16 mirror, the replicated int32 neighbour
    table, and the selection's output (every gathered query's local top-M values and ids)."""
    shard = -(-n // world)
    q = world * batch
    return {"bank_shard_float32": shard * dim * 4, "bank_mirror_float16": shard * dim * 2,
            "neighbour_table_int32": n * k * 4, "local_top_m": q * min(m, shard) * 12}


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


def _worker(rank: int, world: int, out: str, reps: int) -> None:
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
                start = time.perf_counter()
                call()
                if i >= 2:
                    times.append(time.perf_counter() - start)
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


def measure(worlds: list[int], reps: int, tmp: Path) -> dict:
    from invprop.jobs.spawn import spawn_ranks

    found = {}
    for world in worlds:
        out = tmp / f"w{world}.json"
        spawn_ranks(_worker, world, (str(out), reps), timeout_s=600)
        times = json.loads(out.read_text())
        found[str(world)] = {op: {"ms": t, **fit(t, op, world)} for op, t in times.items()}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-only", action="store_true")
    args = parser.parse_args()
    summary: dict = {"cpus": os.cpu_count(), "sizes_bytes": list(SIZES),
                     "step_bytes": {w: step_collectives(w) for w in (8, 16, 64, 256)},
                     "memory_per_rank": {w: memory_per_rank(w) for w in (8, 16, 64, 256)}}
    if not args.model_only:
        import tempfile

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
