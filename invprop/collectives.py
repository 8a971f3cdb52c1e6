"""Collectives for the sharded bank, differentiable where gradients must cross ranks, as methods of `Comm`.

A `Comm` says which rank this process is, how many there are, on which device it computes and which process
groups its collectives use. `distributed.init` builds it once per process and everything that communicates (the
bank, the losses through the bank, the step boundary, the checkpointer) is handed that one object, so the world
size has one source. With one rank every method is the identity and no process group is needed, so the
single-process path runs the very same code as W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Comm:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    # Bank collectives use their own group so they never interleave with DDP's asynchronous gradient buckets
    # (None: the default group).
    group: dist.ProcessGroup | None = None
    # gloo, for flags the host decides on (preemption, save due): all-reducing them through NCCL and reading the
    # result back would wait for every queued kernel, once per step. None: through `group` on `device`.
    control: dist.ProcessGroup | None = None
    backend: str = "none"  # nccl | gloo | none (one rank)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not one of {self.world} ranks")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows (equal counts); gradients flow back to their rank."""
        if self.world == 1:
            return x
        if x.requires_grad:
            return _GatherRows.apply(x, self)
        return self._all_gather(x)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable all-reduce sum."""
        if self.world == 1:
            return x
        if x.requires_grad:
            return _SumAcrossRanks.apply(x, self)
        out = x.contiguous().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Non-differentiable all-reduce max (used for stabilisers and flags)."""
        if self.world == 1:
            return x
        out = x.detach().contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def host_flags_any(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of host flags over the ranks: on the CPU through the control group when there is one
        (no GPU sync), else through the bank group on `device`; no collective at all for one process."""
        if self.world == 1:
            return list(flags)
        on_host = self.control is not None
        values = torch.tensor([float(f) for f in flags], device="cpu" if on_host else self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.control if on_host else self.group)
        return [v > 0 for v in values.tolist()]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank (through the control group, on the host);
        small things only: manifest entries, messages."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control if self.control is not None else self.group)
        return out

    def gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """Non-differentiable all_gather, stacked as (world, *x.shape)."""
        if self.world == 1:
            return x.detach().unsqueeze(0)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous(), group=self.group)
        return torch.stack(parts)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradient of every rank's copy into the owner's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.rows = comm, x.shape[0]
        return comm._all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.comm.group)
        rank = ctx.comm.rank
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows], None


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM); every rank's copy of the output feeds its own loss, so the backward sums too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        ctx.comm = comm
        out = x.contiguous().clone()
        dist.all_reduce(out, group=comm.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.comm.group)
        return grad, None
