"""A run's results.json as one typed record.

Training writes its part (jobs/pretrain.py), each evaluation protocol merges its figures (`merge`), and the
summary table, the reports and tools/status.py read it back (`read`). The file stays one flat JSON object, so
a run's numbers are where they always were; the record names the keys training writes, and keeps the
evaluations' figures (knn_top1, linear_top1, semisup_1pct_top1, eval_<protocol>_wall_s, ...) by key.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invprop.metrics import update_results

FILE = "results.json"


@dataclass
class RunResults:
    state_digest: str | None = None  # sha256 of weights, bank and graph at the last step
    final_train_loss: float | None = None
    epochs: int | None = None
    images: int | None = None
    steps: int | None = None
    world_size: int | None = None
    dist_backend: str | None = None
    train_wall_s: float | None = None
    wall_s: float | None = None
    slurm_restart_count: int | None = None
    bank_selection: str | None = None  # what the bank's top-M ran (`auto`'s choice)
    bank_selection_ms: dict[str, float] | None = None  # its steady-state timings per strategy
    data_format: str | None = None  # the loader data.format asked for ...
    loader: str | None = None  # ... and the one that ran (torchvision where FFCV does not import)
    preempted_at_step: int | None = None  # a run that stopped before its last step (-1: no checkpoint yet)
    evaluations: dict[str, Any] = field(default_factory=dict)  # every other key: the protocols' figures

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunResults:
        named = {f.name for f in dataclasses.fields(cls)} - {"evaluations"}
        return cls(**{k: v for k, v in values.items() if k in named},
                   evaluations={k: v for k, v in values.items() if k not in named})

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object results.json holds (unset keys left out)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "evaluations"}
        return {**{k: v for k, v in flat.items() if v is not None}, **self.evaluations}

    def merge(self, protocol_results: Mapping[str, Any]) -> RunResults:
        """This record with an evaluation's (or training's) figures on top; the same key is replaced."""
        return RunResults.from_dict({**self.to_dict(), **protocol_results})

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    @classmethod
    def read(cls, run_dir: Path) -> RunResults:
        """The run's record; empty when nothing has been written yet."""
        path = Path(run_dir) / FILE
        return cls.from_dict(json.loads(path.read_text())) if path.exists() else cls()

    def write_into(self, run_dir: Path) -> RunResults:
        """Merge this record into run_dir/results.json under its lock (other jobs' keys kept); the merged record."""
        return RunResults.from_dict(update_results(Path(run_dir), self.to_dict()))
