"""cluster=local: run the job on this machine, blocking, with W ranks as local processes."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from invprop.config import world_size
from invprop.jobs.pretrain import pretrain, pretrain_rank
from invprop.jobs.spawn import spawn_ranks


def run_local(cfg: DictConfig, run_dir: Path) -> dict:
    world = world_size(cfg)
    if world == 1:
        return pretrain(run_dir)
    spawn_ranks(pretrain_rank, world, (str(run_dir),), timeout_s=float(cfg.get("local_timeout_s", 24 * 3600)))
    results = Path(run_dir) / "results.json"
    return json.loads(results.read_text()) if results.exists() else {"preempted_at_step": -1}
