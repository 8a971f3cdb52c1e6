"""The scale-out checks of docs/SCALING.md on this machine, written to one JSON.

    python tools/scale_check.py --out docs/results/scale_check.json [--parts bank,ckpt,slurm]

bank   W = 64 ranks forked after the imports (sharing those pages): one InvP step equal to the dense reference,
       its collectives counted (bytes each rank sends, scaled to batch 256 per rank), a committed save, then a
       resume at W = 32 with equal rows and the bytes each rank read (invprop/testing/bank_step.py).
ckpt   An ImageNet-shaped checkpoint (bank 1,281,167 x 128 float32 + a ResNet-50-sized model and momentum):
       save seconds at W = 1 and W = 8, and on a same-world resume at W = 8 the bytes each rank read against
       its own shard + state.pt.
slurm  The card's launch on the local 8-node cluster (`tools/scale_check.sh` brings it up): 16 ranks (8 x 2)
       train with chained kNN, one USR2 mid-run gives the collective save and the requeue, the requeued job
       resumes; then the run, stopped again, resumes at 8 ranks (8 x 1). Seconds from submit to the first
       step, seconds per step, per-rank memory, steps contiguous, no rank left running.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from invprop import checkpoint, distributed  # noqa: E402
from invprop.bank import ShardedBank  # noqa: E402
from invprop.testing.bank_step import StepShape, build_problem, resume_rank, step_rank  # noqa: E402
from invprop.testing.forked_ranks import run_forked  # noqa: E402
from invprop.testing.stand_ins import Weights  # noqa: E402

console = Console(stderr=True)
FULL_BATCH = 256


def bank_part(world: int, resume_world: int, shape: StepShape) -> dict[str, Any]:
    problem = build_problem(shape, world)
    ckpt = Path(tempfile.mkdtemp(prefix="invprop-scale-bank-"))
    try:
        start = time.perf_counter()
        steps = run_forked(step_rank, world, (problem, str(ckpt)))
        step_wall = time.perf_counter() - start
        resumed = run_forked(resume_rank, resume_world, (problem, str(ckpt)))
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    scale = FULL_BATCH / shape.batch
    sent = [sum(r["sent_bytes"].values()) for r in steps]
    by_op: dict[str, float] = {}
    for r in steps:
        for op, b in r["sent_bytes"].items():
            by_op[op] = max(by_op.get(op, 0.0), b * scale)
    return {
        "world": world, "resume_world": resume_world, "shape": shape.__dict__,
        "step_equal_to_dense": {
            "max_loss_error": max(r["errors"]["loss"] for r in steps),
            "max_grad_error": max(r["errors"]["grad"] for r in steps),
            "max_bank_row_error": max(r["errors"]["bank_rows"] for r in steps),
            "graph_equal_on_every_rank": all(r["errors"]["graph_equal"] for r in steps)},
        "bank_bytes_sent_per_rank_at_batch_256_mb": max(sent) * scale / 1e6,
        "bank_bytes_sent_per_rank_at_batch_256_by_op_mb": {op: b / 1e6 for op, b in by_op.items()},
        "collective_calls_per_step": steps[0]["calls"],
        "local_candidates_per_rank_at_batch_256": int(max(r["local_candidates"] for r in steps) * scale),
        "local_candidate_goal_2_x_batch_x_m": 2 * FULL_BATCH * shape.m,
        "seconds_fork_to_all_done": step_wall,
        "step_s_max": max(r["step_s"] for r in steps),
        "save_s_max": max(r["save_s"] for r in steps),
        "private_rss_mb_per_rank_max": max(r["private_rss_mb"] for r in steps),
        "resume": {"rows_equal_on_every_rank": all(r["rows_equal"] for r in resumed),
                   "graph_equal_on_every_rank": all(r["graph_equal"] for r in resumed),
                   "load_s_max": max(r["load_s"] for r in resumed),
                   "bytes_read_per_rank_max": max(r["bytes_read"] for r in resumed)},
    }



_CKPT: dict[str, Any] = {}  # the parent's tensors, shared with the forked ranks


def _save_rank(rank: int, world: int, root: str) -> dict[str, float]:
    comm = distributed.init(distributed.read_env(), timeout_s=600)
    try:
        rows = _CKPT["rows"]
        bank = ShardedBank(rows.shape[0], rows.shape[1], comm=comm)
        bank.load_state_dict({"rows": rows[bank.start:bank.stop].clone(), "start": bank.start, "n": rows.shape[0]})
        parts = {"model": Weights({"w": _CKPT["weights"]}), "optimizer": Weights({"m": _CKPT["momentum"]}),
                 "bank": bank}
        comm.barrier()
        start = time.perf_counter()
        checkpoint.save(Path(root), 1, parts, comm=comm)
        return {"save_s": time.perf_counter() - start}
    finally:
        distributed.shutdown()


def _load_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    comm = distributed.init(distributed.read_env(), timeout_s=600)
    try:
        rows = _CKPT["rows"]
        bank = ShardedBank(rows.shape[0], rows.shape[1], comm=comm)
        parts = {"model": Weights({}), "optimizer": Weights({}), "bank": bank}
        before = checkpoint.IO.bytes_read
        start = time.perf_counter()
        found = checkpoint.latest(Path(root), report=rank == 0, states=parts, comm=comm)
        checkpoint.load(found, parts)
        sizes = {n: e["size"] for n, e in json.loads((found / "COMMITTED").read_text())["files"].items()}
        own = sizes["state.pt"] + sizes[f"bank.{rank}-of-{world}"]
        return {"load_s": time.perf_counter() - start, "bytes_read": checkpoint.IO.bytes_read - before,
                "own_bytes": own, "rows_equal": bool(torch.equal(bank.rows, rows[bank.start:bank.stop]))}
    finally:
        distributed.shutdown()


def ckpt_part(rows: int, dim: int, params: int, world: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    _CKPT.update(rows=torch.randn(rows, dim, generator=gen), weights=torch.randn(params, generator=gen),
                 momentum=torch.randn(params, generator=gen))
    out: dict[str, Any] = {"rows": rows, "dim": dim, "params": params}
    base = Path(tempfile.mkdtemp(prefix="invprop-scale-ckpt-"))
    try:
        for w in (1, world):
            root = base / f"w{w}"
            saves = run_forked(_save_rank, w, (str(root),))
            out[f"save_s_w{w}"] = max(s["save_s"] for s in saves)
            out[f"checkpoint_bytes_w{w}"] = sum(p.stat().st_size for p in (root / "step_1").iterdir())
            if w == world:
                loads = run_forked(_load_rank, w, (str(root),))
                out["resume_w"] = w
                out["resume_bytes_read_per_rank"] = [x["bytes_read"] for x in loads]
                out["resume_read_over_own_max"] = max(x["bytes_read"] / x["own_bytes"] for x in loads)
                out["resume_rows_equal"] = all(x["rows_equal"] for x in loads)
                out["resume_load_s_max"] = max(x["load_s"] for x in loads)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        _CKPT.clear()
    out["save_ratio_w_over_w1"] = out[f"save_s_w{world}"] / out["save_s_w1"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="bank,ckpt")
    parser.add_argument("--world", type=int, default=64)
    parser.add_argument("--resume-world", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="per-rank batch of the counted step")
    parser.add_argument("--rows", type=int, default=65536, help="bank rows of the counted step")
    parser.add_argument("--ckpt-rows", type=int, default=1_281_167)
    parser.add_argument("--ckpt-world", type=int, default=8)
    parser.add_argument("--slurm-result", type=Path, help="the slurm part's JSON (tools/scale_check.sh)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {}
    if args.out.exists():  # parts run separately land in one file
        result = json.loads(args.out.read_text())
    if "bank" in parts:
        console.print(f"bank: one InvP step at W = {args.world} (forked ranks), resume at W = {args.resume_world}")
        result["bank"] = bank_part(args.world, args.resume_world, StepShape(rows=args.rows, batch=args.batch))
    if "ckpt" in parts:
        console.print(f"ckpt: ImageNet-shaped checkpoint, W = 1 and W = {args.ckpt_world}")
        result["ckpt"] = ckpt_part(args.ckpt_rows, 128, 25_557_032, args.ckpt_world)
    if args.slurm_result is not None:
        result["slurm"] = json.loads(args.slurm_result.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    table = Table(title=f"scale check -> {args.out}")
    table.add_column("measure")
    table.add_column("value")
    if "bank" in result:
        b = result["bank"]
        table.add_row(f"W = {b['world']}: step equal to dense (max grad error)",
                      f"{b['step_equal_to_dense']['max_grad_error']:.2e}")
        table.add_row("bank MB sent per rank per step (batch 256)",
                      f"{b['bank_bytes_sent_per_rank_at_batch_256_mb']:.1f}")
        table.add_row(f"resume at W = {b['resume_world']}: rows equal", str(b["resume"]["rows_equal_on_every_rank"]))
    if "ckpt" in result:
        c = result["ckpt"]
        table.add_row("ckpt: bytes read / own (max over ranks)", f"{c['resume_read_over_own_max']:.3f}")
        table.add_row(f"ckpt: save W = {args.ckpt_world} / W = 1", f"{c['save_ratio_w_over_w1']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
