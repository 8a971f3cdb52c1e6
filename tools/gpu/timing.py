"""Timing helpers of the GPU check: median and pipelined seconds per call, the host's launch time, and the
host syncs one call makes (CUDA only)."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def enqueue_time(fn, device: torch.device, iters: int) -> float:
    """Median seconds the host spends in one call started on an idle device, without a wait at the end. Waits
    inside the call (`host_syncs`) are included; where there are none this is the launch overhead, which a step
    cannot hide when the device finishes its kernels sooner (on the CPU: the whole call)."""
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    sync(device)
    return sorted(times)[len(times) // 2]


def pipelined(fn, device: torch.device, iters: int) -> float:
    """Seconds per call of `iters` back-to-back calls with one sync at the end: the steady-state cost in a
    training loop, where the host queues the next step while the device still runs this one."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def host_syncs(fn, device: torch.device) -> int | None:
    """How many times one call of `fn` makes the host wait for the GPU (CUDA's sync debug mode)."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
