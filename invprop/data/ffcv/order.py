"""Traversal orders of the FFCV loaders: which dataset rows a ``Loader`` reads, in which order.

:class:`ResumableOrder` (training) is exactly ``EpochOrder.local_indices(epoch, b, rank, world)`` for
``b = start_batch .. num_batches - 1``, concatenated: the batches of the torchvision path, so the two paths see
the same samples per step, for any world size, and a resume reads nothing before ``start_batch``.
:class:`ShardOrder` (evaluation) is rank ``rank``'s rows of :func:`invprop.data.order.shard_bounds` in file
order, the rows the memory bank gives that rank.

Both are created before their ``Loader`` and keep being changed after it is built (see
:class:`invprop.data.ffcv.compat.BoundOrder`).
"""

from __future__ import annotations

import numpy as np
import torch

from invprop.data.ffcv.compat import BoundOrder
from invprop.data.order import EpochOrder, shard_bounds

__all__ = ["ResumableOrder", "ShardOrder"]


class ResumableOrder(BoundOrder):
    """Rank ``rank``'s part of ``EpochOrder``: batches ``start_batch ..`` of epoch ``epoch``, concatenated."""

    def __init__(self, order: EpochOrder, rank: int, world: int) -> None:
        super().__init__()
        self.order = order
        self.rank = int(rank)
        self.world = int(world)
        self.local_batch = order.local_batch_size(world)  # raises if world does not divide the global batch
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.start_batch = 0

    @property
    def num_batches(self) -> int:
        return self.order.num_batches

    def sample_order(self, epoch: int) -> np.ndarray:
        parts = [
            self.order.local_indices(epoch, b, self.rank, self.world)
            for b in range(self.start_batch, self.order.num_batches)
        ]
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return torch.cat(parts).numpy().astype(np.uint64)


class ShardOrder(BoundOrder):
    """Rank ``rank``'s contiguous shard of ``n`` rows, in file order (evaluation)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        super().__init__()
        if not 0 <= int(rank) < int(world):
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.start, self.stop = shard_bounds(int(n), int(rank), int(world))

    def sample_order(self, epoch: int) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.uint64)
