"""Save and load time of a committed checkpoint with an ImageNet-scale bank (1.28M x 128 by default).

    python tools/bench_checkpoint.py [--rows 1281167] [--dim 128] [--dir /tmp/ckpt_bench] [--json]

Times `invprop.checkpoint.save` (bank shard + a ResNet-50-sized state, temp files, fsync, os.replace, COMMITTED)
and the load path a resumed job takes (`latest` + `load_state` + `load_bank_shard`), single process.
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
from invprop.graph import NeighbourGraph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--params", type=int, default=25_557_032, help="model parameters (ResNet-50)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/invprop_ckpt_bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    bank = torch.nn.functional.normalize(torch.randn(args.rows, args.dim), dim=1)
    weights = torch.randn(args.params)
    graph = NeighbourGraph(args.rows, 4)
    state = {"model": {"w": weights}, "optimizer": {"momentum": weights.clone()}, "graph": graph.table}
    start = time.perf_counter()
    directory = checkpoint.save(args.dir, 1, 0, 1, state, bank, 0, args.rows)
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in directory.iterdir())
    start = time.perf_counter()
    latest = checkpoint.latest(args.dir)
    loaded = checkpoint.load_state(latest)
    rows = checkpoint.load_bank_shard(latest, args.rows, 0, 1)
    load_s = time.perf_counter() - start
    assert torch.equal(rows, bank) and torch.equal(loaded["graph"], graph.table)
    result = {"rows": args.rows, "dim": args.dim, "bank_bytes": bank.numel() * 4, "checkpoint_bytes": size,
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
