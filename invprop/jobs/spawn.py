"""Start W ranks on this machine (cluster=local gpus=W, and the distributed tests)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from invprop.distributed import free_port


def _enter(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, ready: Any) -> None:
    # From here on a stop signal waits for the rank's next step boundary (the launcher forwards its own).
    from invprop.train.boundary import defer

    defer(signal.SIGUSR2, signal.SIGINT)  # SIGINT: a Ctrl-C reaches the whole process group, ranks included
    ready.set()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Ranks share the machine's cores; one thread each avoids oversubscription.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fn(rank, world, *args)


def spawn_ranks(fn: Callable[..., Any], world: int, args: tuple = (), timeout_s: float = 600.0,
                grace_s: float = 15.0, forward: tuple[signal.Signals, ...] = ()) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes; raise if any fails or the group outlives timeout_s.

    After the first failure the others get `grace_s` to notice and report it themselves, then are
    terminated, so a dead rank never leaves its peers waiting. Each signal in `forward` that reaches this
    process is passed on to every rank as SIGUSR2 (their agreed save-and-stop), once the rank is ready for it,
    and the ranks are waited for as usual.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    ready = [ctx.Event() for _ in range(world)]
    procs = [ctx.Process(target=_enter, args=(fn, r, world, port, args, ready[r]), daemon=False)
             for r in range(world)]
    requested: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: requested.append(signum)) for sig in forward}
    told: set[int] = set()
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while any(p.is_alive() for p in procs):
            if requested:
                for r, proc in enumerate(procs):
                    if r not in told and ready[r].is_set() and proc.is_alive():
                        os.kill(proc.pid, signal.SIGUSR2)
                        told.add(r)
            if any(p.exitcode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace_s)
            if time.monotonic() > deadline:
                timed_out = not any(p.exitcode not in (None, 0) for p in procs)
                break
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        stuck = []
        for r, proc in enumerate(procs):
            proc.join(10)
            if proc.is_alive():  # stopped (SIGSTOP) or stuck where SIGTERM cannot act: SIGKILL always ends it
                stuck.append(r)
                proc.kill()
                proc.join(10)
    if timed_out:
        raise TimeoutError(f"ranks did not finish within {timeout_s:.0f}s")
    failed = [f"rank {r} stopped responding (killed)" if r in stuck else f"rank {r} exited with {p.exitcode}"
              for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError("distributed run failed: " + "; ".join(failed))
