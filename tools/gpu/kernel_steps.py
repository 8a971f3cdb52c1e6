"""The GPU check's kernel timings: the fused top-M alone against the float32 top-k, and the selected scores'
backward (embedding_bag against the Triton kernel), each on the bank's own row layout."""

from __future__ import annotations

import torch

from gpu.probes import kernel_backends, profile_steps
from gpu.timing import timed
from invprop.bank import ShardedBank


def kernel_steps(n: int, batch: int, m: int, device: torch.device, warmup: int, iters: int,
                 **kernel_args: int) -> dict:
    """The local top-M alone (no loss, no backward) on one shard of n rows: the fused kernel (invprop/kernels/
    topm.py) and its torch route, with the float16 copy and the row norm kept as a bank keeps them, against the
    float32 chunked top-k the bank's `topk` runs. Median ms per call, and the queries each route redid."""
    from invprop.kernels.topm import exact_topk, topm

    rows = ShardedBank(n, 128, seed=0, device=device, selection="topk").rows
    gen = torch.Generator().manual_seed(3)
    pick = torch.randperm(n, generator=gen)[:batch].to(device)
    z = torch.nn.functional.normalize(rows[pick] + 0.1 / 128**0.5 * torch.randn(batch, 128, generator=gen)
                                      .to(device), dim=1)
    low, max_norm = rows.to(torch.float16), rows.norm(dim=1).max()
    found: dict = {"rows": n, "batch": batch, "m": m, "ms": {}, "redone": {}}
    for backend in kernel_backends(device):
        args = kernel_args if backend == "triton" else {}

        def call(backend: str = backend, args: dict = args) -> None:
            found["redone"][backend] = topm(z, rows, m, low=low, max_norm=max_norm, backend=backend, **args).redone

        found["ms"][backend] = timed(call, device, warmup, iters) * 1000
    found["ms"]["float32_topk"] = timed(lambda: exact_topk(z, rows, m), device, warmup, iters) * 1000
    found["profile"] = profile_steps({b: (lambda b=b: topm(z, rows, m, low=low, max_norm=max_norm, backend=b,
                                                           **(kernel_args if b == "triton" else {})))
                                      for b in kernel_backends(device)}, device)
    return found


def weighted_rows_steps(n: int, batch: int, width: int, used: int, device: torch.device, warmup: int, iters: int,
                        **kernel_args: int) -> dict:
    """The backward of the selected scores alone (invprop/kernels/weighted_rows.py): per query, `width` buffered
    candidates of which `used` have a non-zero gradient (the top-M; the rest is padding or outside every mask),
    with embedding_bag and, where it runs, the Triton kernel. Median ms per call, and how far the two differ."""
    from invprop.kernels.weighted_rows import weighted_row_sum

    rows = ShardedBank(n, 128, seed=0, device=device, selection="topk").rows
    gen = torch.Generator().manual_seed(4)
    cols = torch.randint(0, n, (batch, width), generator=gen).to(device)
    weights = torch.randn(batch, width, generator=gen)
    weights[torch.rand(batch, width, generator=gen).argsort(1) >= used] = 0  # scattered, as in a selection
    weights = weights.to(device)
    found: dict = {"rows": n, "batch": batch, "width": width, "used": used, "ms": {}}
    outs = {}
    for backend in kernel_backends(device):
        args = kernel_args if backend == "triton" else {}
        outs[backend] = weighted_row_sum(rows, cols, weights, backend=backend, **args)
        found["ms"][backend] = timed(lambda b=backend, a=args: weighted_row_sum(rows, cols, weights, backend=b, **a),
                                     device, warmup, iters) * 1000
    if device.type == "cuda" and "triton" in outs:  # half a row per program: twice the programs in flight
        found["ms"]["triton_block_d64"] = timed(lambda: weighted_row_sum(rows, cols, weights, backend="triton",
                                                                         block_d=64), device, warmup, iters) * 1000
    if len(outs) == 2:
        found["max_abs_diff"] = float((outs["triton"] - outs["torch"]).abs().max())
        fastest = min(v for k, v in found["ms"].items() if k.startswith("triton"))
        found["speedup"] = found["ms"]["torch"] / fastest
    return found
