"""cluster=local: run the job on this machine, blocking, with W ranks as local processes."""

from __future__ import annotations

import signal
from pathlib import Path

from invprop import checkpoint
from invprop.config import Config, world_size
from invprop.jobs.evaluate import evaluate_run
from invprop.jobs.pretrain import finished, pretrain, pretrain_rank
from invprop.jobs.spawn import spawn_ranks
from invprop.results import RunResults


def run_local(cfg: Config, run_dir: Path) -> RunResults:
    """Pretrain (kNN evaluated in the training processes), then the other eval.protocols in this process.

    USR2, SIGTERM or SIGINT (Ctrl-C) stops training at the next step boundary with a committed checkpoint; with
    W ranks this process forwards them. A second Ctrl-C stops at once (the last committed checkpoint is kept).
    A run that did not finish returns {"preempted_at_step": n} (-1: no checkpoint yet).
    """
    world = world_size(cfg)
    stops = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
    if world == 1:
        results = pretrain(run_dir, stop_signals=(signal.SIGTERM, signal.SIGINT))
    else:
        spawn_ranks(pretrain_rank, world, (str(run_dir),), timeout_s=3600.0 * cfg.cluster.run_timeout_h,
                    forward=stops)
        if finished(run_dir):
            results = RunResults.read(run_dir)
        else:
            latest = checkpoint.latest(Path(run_dir) / "checkpoints", report=False)
            results = RunResults(preempted_at_step=-1 if latest is None else checkpoint.step_of(latest))
    if results.preempted_at_step is not None:
        return results
    for protocol in cfg.eval.protocols:
        if protocol != "knn":
            results = results.merge(evaluate_run(run_dir, protocol))  # evaluate_run returns the merged file
    return results
