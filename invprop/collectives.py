"""Collectives for the sharded bank, differentiable where gradients must cross ranks, as methods of `Comm`.

A `Comm` says which rank this process is, how many there are, on which device it computes and which process
groups its collectives use. `distributed.init` builds it once per process and everything that communicates (the
bank, the losses through the bank, the step boundary, the checkpointer) is handed that one object, so the world
size has one source. With one rank every method is the identity and no process group is needed, so the
single-process path runs the very same code as W ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """Bytes this process sends through the bank group's collectives, per operation, counted at each call with
    the ring algorithm's cost (NCCL's for large messages): an all_gather of S bytes per rank sends (W-1) S, an
    all_reduce of S 2 (W-1)/W S, a reduce_scatter of S in all (W-1)/W S, an all_to_all what leaves this rank.
    `tools/bench_collectives.py` reads it around a real training step."""

    sent: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, op: str, nbytes: float) -> None:
        self.sent[op] += nbytes
        self.calls[op] += 1

    def total(self) -> float:
        return float(sum(self.sent.values()))

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()


TRAFFIC = Traffic()

# torch 2.14 renamed the single-tensor collectives; older releases (the GPU machine's 2.11) have the old names only
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


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
        self.all_reduce_(out)
        return out

    def all_reduce_(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        """In-place all_reduce over the bank group, counted in TRAFFIC."""
        TRAFFIC.record("all_reduce", 2.0 * (self.world - 1) / self.world * _nbytes(x))
        dist.all_reduce(x, op=op, group=self.group)

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of `x` (world * r rows), this rank's r-row slice of it only: half an all_reduce's bytes."""
        if self.world == 1:
            return x
        out = x.new_empty(x.shape[0] // self.world, *x.shape[1:])
        TRAFFIC.record("reduce_scatter", (self.world - 1) / self.world * _nbytes(x))
        _reduce_scatter(out, x.contiguous(), group=self.group)
        return out

    def all_to_all_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Row block r of `x` (world equal blocks) goes to rank r; returns the blocks received, in rank order."""
        if self.world == 1:
            return x
        out = torch.empty_like(x)
        TRAFFIC.record("all_to_all", (self.world - 1) / self.world * _nbytes(x))
        dist.all_to_all_single(out, x.contiguous(), group=self.group)
        return out

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Non-differentiable all-reduce max (used for stabilisers and flags)."""
        if self.world == 1:
            return x
        out = x.detach().contiguous().clone()
        self.all_reduce_(out, op=dist.ReduceOp.MAX)
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
        flat = x.detach().reshape(1, -1) if x.dim() == 0 else x.detach()
        return self._all_gather(flat).view(self.world, *x.shape)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(self.world * x.shape[0], *x.shape[1:])
        TRAFFIC.record("all_gather", (self.world - 1) * _nbytes(x))
        _all_gather(out, x.contiguous(), group=self.group)
        return out

    def replicate_owned(self, local: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like `owner` whose entry e is rank owner[e]'s local[e], on every rank; differentiable.

        `owner` (the same on every rank) says which rank computes each entry; `local` holds this rank's values
        at its own entries (anything elsewhere). Only the owned entries travel: an all_gather of each rank's
        packed values (padded to the largest count) instead of an all_reduce of a mostly-zero tensor, and a
        reduce_scatter of the packed gradients back. Values arrive bit-identical on every rank.
        """
        if self.world == 1:
            return local
        return _ReplicateOwned.apply(local, owner, self)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradient of every rank's copy into the owner's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.rows = comm, x.shape[0]
        return comm._all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # every rank's copy fed its own loss: this rank's rows get the sum of all copies' gradients
        return ctx.comm.reduce_scatter_rows(grad), None


class _ReplicateOwned(torch.autograd.Function):
    """`Comm.replicate_owned`: pack each rank's owned entries (row-major order), all_gather, unpack."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, owner: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        flat_owner = owner.reshape(-1)
        order = torch.argsort(flat_owner, stable=True)  # entries grouped by owner, row-major within each
        counts = torch.bincount(flat_owner, minlength=comm.world)
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel(), device=order.device) - starts[flat_owner[order]]
        mine = flat_owner == comm.rank
        packed = local.new_zeros(width)
        packed[slot[mine]] = local.reshape(-1)[mine]
        gathered = comm.gather_stack(packed)  # (world, width)
        ctx.save_for_backward(flat_owner, slot, mine)
        ctx.comm, ctx.width, ctx.shape = comm, width, local.shape
        return gathered[flat_owner, slot].view(local.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        flat_owner, slot, mine = ctx.saved_tensors
        comm = ctx.comm
        packed = grad.new_zeros(comm.world, ctx.width)
        packed[flat_owner, slot] = grad.reshape(-1)
        own = comm.reduce_scatter_rows(packed).reshape(-1)  # this rank's entries, summed over every copy
        out = grad.new_zeros(flat_owner.numel())
        out[mine] = own[slot[mine]]
        return out.view(ctx.shape), None, None


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM); every rank's copy of the output feeds its own loss, so the backward sums too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        ctx.comm = comm
        out = x.contiguous().clone()
        comm.all_reduce_(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        ctx.comm.all_reduce_(grad)
        return grad, None
