"""Collectives for the sharded bank: differentiable where gradients must cross ranks.

Every function degrades to the identity when no process group is initialised, so the
single-process path runs the very same code as W ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_GROUP: dist.ProcessGroup | None = None
_CONTROL: dist.ProcessGroup | None = None  # gloo: host-side decisions without touching the GPU stream


def set_group(group: dist.ProcessGroup | None) -> None:
    """Use a dedicated group so bank collectives never interleave with DDP's gradient buckets."""
    global _GROUP
    _GROUP = group


def set_control_group(group: dist.ProcessGroup | None) -> None:
    """A gloo group for flags the host decides on (preemption, save due): all-reducing them through NCCL and
    reading the result back would wait for every queued kernel, once per step."""
    global _CONTROL
    _CONTROL = group


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(_GROUP), dist.get_world_size(_GROUP)
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradient of every rank's copy into the owner's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=_GROUP)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_GROUP)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM); every rank's copy of the output feeds its own loss, so the backward sums too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, group=_GROUP)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_GROUP)
        return grad


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (equal counts); gradients flow back to their rank."""
    if rank_and_world()[1] == 1:
        return x
    if x.requires_grad:
        return _GatherRows.apply(x)
    rank, world = rank_and_world()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=_GROUP)
    return torch.cat(parts)


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce sum."""
    if rank_and_world()[1] == 1:
        return x
    if x.requires_grad:
        return _SumAcrossRanks.apply(x)
    out = x.contiguous().clone()
    dist.all_reduce(out, group=_GROUP)
    return out


def max_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Non-differentiable all-reduce max (used for stabilisers and flags)."""
    if rank_and_world()[1] == 1:
        return x
    out = x.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=_GROUP)
    return out


def host_flags_any(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of host flags over the ranks: on the CPU through the control group when there is one
    (no GPU sync), else through the bank group on `device`; no collective at all for one process."""
    if rank_and_world()[1] == 1:
        return list(flags)
    on_host = _CONTROL is not None
    values = torch.tensor([float(f) for f in flags], device="cpu" if on_host else device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_CONTROL if on_host else _GROUP)
    return [v > 0 for v in values.tolist()]


def gather_stack(x: torch.Tensor) -> torch.Tensor:
    """Non-differentiable all_gather, stacked as (world, *x.shape)."""
    _, world = rank_and_world()
    if world == 1:
        return x.detach().unsqueeze(0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=_GROUP)
    return torch.stack(parts)


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier(group=_GROUP)
