"""Resumable, world-size-independent data order.

The order of epoch e is ``torch.randperm(n)`` from a generator seeded with ``derive_seed(seed, e)``, cut to
whole global batches (``drop_last``). Global batch b is split into ``world`` contiguous slices, one per
rank, so the set of samples of every global step is the same for any world size that divides the global
batch: a run may resume on a different number of ranks and still see exactly the same batches. The position
to checkpoint is just ``(epoch, next_batch)``.

:func:`shard_bounds` is the one split of dataset rows among ranks: the memory bank's shards
(``invprop.bank``), the checkpoint's resharding and the FFCV evaluation loader all cut rows with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from invprop.data.seeding import derive_seed

__all__ = ["EpochOrder", "shard_bounds"]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous shard of rank `rank`; the last rank takes the remainder."""
    base = n // world
    start = rank * base
    stop = n if rank == world - 1 else start + base
    return start, stop


class EpochOrder:
    """Per-epoch permutation of ``range(n)`` in whole global batches of ``global_batch`` samples."""

    def __init__(self, n: int, global_batch: int, seed: int) -> None:
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if global_batch > n:
            raise ValueError(f"global_batch ({global_batch}) is larger than the dataset ({n} samples)")
        self.n = int(n)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    @property
    def num_batches(self) -> int:
        """Global batches per epoch (the incomplete last batch is dropped)."""
        return self.n // self.global_batch

    def __len__(self) -> int:
        return self.num_batches

    def local_batch_size(self, world: int) -> int:
        self._check_world(world)
        return self.global_batch // world

    def permutation(self, epoch: int) -> torch.LongTensor:
        """The full permutation of epoch ``epoch`` (before dropping the tail)."""
        if self._cached_epoch != epoch or self._cached_perm is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, int(epoch)))
            self._cached_perm = torch.randperm(self.n, generator=g)
            self._cached_epoch = int(epoch)
        return self._cached_perm

    def global_batch_indices(self, epoch: int, b: int) -> torch.LongTensor:
        """Dataset indices of global batch ``b`` of ``epoch`` (``global_batch`` of them)."""
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} out of range [0, {self.num_batches})")
        start = b * self.global_batch
        return self.permutation(epoch)[start : start + self.global_batch].clone()

    def local_indices(self, epoch: int, b: int, rank: int, world: int) -> torch.LongTensor:
        """Rank ``rank``'s contiguous slice (``global_batch // world`` indices) of global batch ``b``."""
        local = self.local_batch_size(world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        return self.global_batch_indices(epoch, b)[rank * local : (rank + 1) * local]

    def _check_world(self, world: int) -> None:
        if world < 1 or self.global_batch % world != 0:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by world size {world}: "
                "every rank must get the same number of samples"
            )

    def __repr__(self) -> str:
        return f"EpochOrder(n={self.n}, global_batch={self.global_batch}, seed={self.seed})"


@dataclass
class DataPosition:
    """Where the data stream stands: `epoch` epochs completed and `batch` global batches done in the next one.
    With the seeded order that is all a resume needs of the data (a checkpoint part, see invprop.state)."""

    num_batches: int  # global batches per epoch (EpochOrder.num_batches)
    epoch: int = 0
    batch: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A position past this run's epoch would yield no batch at all: say why instead of looping on it.
        if not 0 <= state["batch"] < self.num_batches:
            raise ValueError(f"stopped at batch {state['batch']} of an epoch, but this run has {self.num_batches} "
                             "batches per epoch (train.batch_size changed?); use the original train.batch_size "
                             "or a new out_dir")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
