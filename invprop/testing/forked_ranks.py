"""W gloo ranks as processes forked after the imports, sharing those pages (torch alone is ~290 MB a process when
each rank imports it itself): how the scale check holds 64 ranks in this machine's memory.

Each rank runs fn(rank, world, *args) with the torchrun variables set, so `distributed.init(read_env())` builds
its Comm, and returns a picklable result; `run_forked` returns the results in rank order or raises naming the
first rank that failed. Only for tools and tests: the product's ranks are spawned (jobs/spawn.py) or started by
SLURM.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invprop.distributed import free_port


def private_rss_mb() -> float:
    """This process's private resident memory (pages shared with the parent after fork not counted)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024


def _enter(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)  # W ranks on a few cores: one thread each
    code = 0
    try:
        result: Any = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        result, code = ("error", traceback.format_exc()), 1
    with open(out, "wb") as fh:
        pickle.dump(result, fh)
    os._exit(code)  # no atexit handlers of the parent's state in the child


def run_forked(fn: Callable[..., Any], world: int, args: tuple = (), timeout_s: float = 600.0) -> list[Any]:
    """fn's result from each of `world` forked ranks, in rank order."""
    ctx = mp.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="invprop-forked-") as tmp:
        outs = [os.path.join(tmp, f"{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=_enter, args=(fn, r, world, port, args, outs[r])) for r in range(world)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        try:
            for proc in procs:
                proc.join(max(1.0, deadline - time.monotonic()))
                if proc.is_alive():
                    raise TimeoutError(f"{world} forked ranks outlived {timeout_s:.0f} s")
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        results = []
        for rank, path in enumerate(outs):
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} exited with {procs[rank].exitcode} and no result")
            with open(path, "rb") as fh:
                status, value = pickle.load(fh)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
