"""Start W ranks on this machine (cluster=local gpus=W, and the distributed tests)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

from invprop.distributed import free_port


def _enter(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Ranks share the machine's cores; one thread each avoids oversubscription.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fn(rank, world, *args)


def spawn_ranks(fn: Callable[..., Any], world: int, args: tuple = (), timeout_s: float = 600.0,
                grace_s: float = 15.0) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes; raise if any fails or the group outlives timeout_s.

    After the first failure the others get `grace_s` to notice and report it themselves, then are
    terminated, so a dead rank never leaves its peers waiting.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_enter, args=(fn, r, world, port, args), daemon=False) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace_s)
            if time.monotonic() > deadline:
                timed_out = not any(p.exitcode not in (None, 0) for p in procs)
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(10)
    if timed_out:
        raise TimeoutError(f"ranks did not finish within {timeout_s:.0f}s")
    failed = [f"rank {r} exited with {p.exitcode}" for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError("distributed run failed: " + "; ".join(failed))
