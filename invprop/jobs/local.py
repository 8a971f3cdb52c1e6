"""cluster=local: run the job on this machine, blocking, with W ranks as local processes."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from invprop.config import world_size
from invprop.jobs.evaluate import evaluate_run
from invprop.jobs.pretrain import pretrain, pretrain_rank
from invprop.jobs.spawn import spawn_ranks


def run_local(cfg: DictConfig, run_dir: Path) -> dict:
    """Pretrain (kNN evaluated in the training processes), then the other eval.protocols in this process."""
    world = world_size(cfg)
    if world == 1:
        results = pretrain(run_dir)
    else:
        spawn_ranks(pretrain_rank, world, (str(run_dir),), timeout_s=float(cfg.get("local_timeout_s", 24 * 3600)))
        path = Path(run_dir) / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {"preempted_at_step": -1}
    if "preempted_at_step" in results:
        return results
    for protocol in cfg.eval.get("protocols", ["knn"]):
        if protocol != "knn":
            results = evaluate_run(run_dir, protocol)
    return results
