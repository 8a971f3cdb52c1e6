"""What a checkpoint is made of (docs/DESIGN.md, "The checkpoint protocol"): parts that each own their state.

Every part of a run that a resume needs (weights, optimiser, bank, neighbour graph, train and data positions,
RNG) is a `Stateful`; the trainer hands them to the checkpointer by name and never reaches inside them. A part
split over the ranks (the bank) is a `ShardedStateful`: each rank saves its own shard, and on load it is given
every saved shard, from whatever world size saved them, and keeps its own rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value, default=str)


def identity_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """'key=new (run has old), ...' for each recorded setting that `current` changes, or None. A key the record
    lacks is a setting added since the run started (its value is what the code did then): not a change."""
    differ = [k for k in sorted(recorded) if recorded[k] != current.get(k, _MISSING)]
    if not differ:
        return None
    return ", ".join(f"{k}={_show(current.get(k, _MISSING))} (run has {_show(recorded[k])})" for k in differ)


class RunIdentity:
    """The settings a checkpoint must share with the run that resumes it (for training, the config's identity:
    invprop/config/identity.py): saved with it, and compared, not loaded, so that a checkpoint this run cannot
    continue is refused before any weight is touched. The one check of a resume: the launcher applies it to the
    run directory's identity.json too."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = dict(fields)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.fields)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changes = identity_changes(state, self.fields)
        if changes:
            raise ValueError(f"holds a run these settings cannot continue: {changes}; drop the changes to resume "
                             "it, or pass a new out_dir= to start a new run")
