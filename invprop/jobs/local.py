"""cluster=local: run the job on this machine, blocking, with W ranks as local processes."""

from __future__ import annotations

import signal
from pathlib import Path

from invprop import checkpoint
from invprop.config import Config, world_size
from invprop.jobs.evaluate import evaluate_local
from invprop.jobs.pretrain import finished, pretrain, pretrain_rank
from invprop.jobs.spawn import spawn_ranks
from invprop.results import RunResults


def run_local(cfg: Config, run_dir: Path) -> RunResults:
    """Pretrain, then each of eval.protocols in the evaluation world (jobs/evaluate.py: eval.gpus ranks here),
    the same body the SLURM evaluation job runs.

    USR2, SIGTERM or SIGINT (Ctrl-C) stops training at the next step boundary with a committed checkpoint; with
    W ranks this process forwards them. A second Ctrl-C stops at once (the last committed checkpoint is kept).
    A run that did not finish returns {"preempted_at_step": n} (-1: no checkpoint yet).
    """
    world = world_size(cfg)
    stops = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
    if world == 1:
        results = pretrain(run_dir, evaluate=False, stop_signals=(signal.SIGTERM, signal.SIGINT))
    else:
        spawn_ranks(pretrain_rank, world, (str(run_dir), False), timeout_s=3600.0 * cfg.cluster.run_timeout_h,
                    forward=stops)
        if finished(run_dir):
            results = RunResults.read(run_dir)
        else:
            latest = checkpoint.latest(Path(run_dir) / "checkpoints", report=False)
            results = RunResults(preempted_at_step=-1 if latest is None else checkpoint.step_of(latest))
    if results.preempted_at_step is not None:
        return results
    for protocol in cfg.eval.protocols:
        # evaluate_local returns the merged results.json (or the stopped evaluation's record)
        results = RunResults.from_dict(evaluate_local(run_dir, protocol, timeout_s=3600.0 * cfg.cluster.run_timeout_h))
        if results.preempted_at_step is not None:
            return results
    return results
