"""Save and load time of a committed checkpoint with an ImageNet-scale bank (1.28M x 128 by default).

    python tools/bench_checkpoint.py [--rows 1281167] [--dim 128] [--dir /tmp/ckpt_bench] [--json]

Times `invprop.checkpoint.save` (bank shard + a ResNet-50-sized state, temp files, fsync, os.replace, COMMITTED)
and the load path a resumed job takes (`latest` + `load`: state.pt and the bank shards), single process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from invprop import checkpoint
from invprop.bank import ShardedBank
from invprop.graph import NeighbourGraph
from invprop.testing.stand_ins import Weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--params", type=int, default=25_557_032, help="model parameters (ResNet-50)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/invprop_ckpt_bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    rows = torch.nn.functional.normalize(torch.randn(args.rows, args.dim), dim=1)
    bank = ShardedBank(args.rows, args.dim)
    bank.load_state_dict({"rows": rows, "start": 0, "n": args.rows})
    weights = torch.randn(args.params)
    graph = NeighbourGraph(args.rows, 4)
    parts = {"model": Weights({"w": weights}), "optimizer": Weights({"momentum": weights.clone()}), "bank": bank,
             "graph": graph}
    start = time.perf_counter()
    directory = checkpoint.save(args.dir, 1, parts)
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in directory.iterdir())
    start = time.perf_counter()
    latest = checkpoint.latest(args.dir)
    loaded = {"model": Weights({}), "optimizer": Weights({}), "bank": ShardedBank(args.rows, args.dim),
              "graph": NeighbourGraph(args.rows, 4)}
    checkpoint.load(latest, loaded)
    load_s = time.perf_counter() - start
    assert torch.equal(loaded["bank"].rows, rows) and torch.equal(loaded["graph"].table, graph.table)
    result = {"rows": args.rows, "dim": args.dim, "bank_bytes": rows.numel() * 4, "checkpoint_bytes": size,
              "save_s": save_s, "load_s": load_s}
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title="committed checkpoint, single process")
    for key in result:
        table.add_column(key)
    table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in result.values()))
    Console().print(table)


if __name__ == "__main__":
    main()
