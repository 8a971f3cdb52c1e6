"""What a checkpoint is made of (docs/DESIGN.md, "The checkpoint protocol"): parts that each own their state.

Every part of a run that a resume needs (weights, optimiser, bank, neighbour graph, train and data positions,
RNG) is a `Stateful`; the trainer hands them to the checkpointer by name and never reaches inside them. A part
split over the ranks (the bank) is a `ShardedStateful`: each rank saves its own shard, and on load it is given
every saved shard, from whatever world size saved them, and keeps its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    """state_dict() is plain data (tensors, numbers, lists, dicts) that load_state_dict() puts back in place.
    torch.nn.Module and torch.optim.Optimizer already are one. A saved state that does not fit this run raises
    ValueError with a message that continues "checkpoint <directory> ..." (the checkpointer adds that part)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ShardedStateful(Stateful, Protocol):
    """state_dict() is this rank's shard only; load_shards() receives the saved shards and takes what this rank
    owns. A part that also has `row_range() -> (start, stop)` is handed only the shards overlapping those rows
    (and a resume reads only those files); without it, every saved shard."""

    def load_shards(self, shards: Sequence[dict[str, Any]]) -> None: ...


class TorchRng:
    """torch's global (CPU) generator: what the old trainer saved, and all a deterministic resume draws from."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])


class RunIdentity:
    """What a checkpoint must match to be resumed by this run (sizes, architecture, method): saved with it, and
    compared, not loaded, so that a checkpoint of another run is refused before any weight is touched."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = dict(fields)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.fields)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state != self.fields:
            diff = ", ".join(f"{k}: checkpoint {state.get(k)!r} vs run {v!r}" for k, v in self.fields.items()
                             if state.get(k) != v)
            raise ValueError(f"does not match this run ({diff}); use a new out_dir or the original config")
