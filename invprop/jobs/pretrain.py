"""The pretraining job body: one call per rank, the same under cluster=local, torchrun and SLURM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from invprop import checkpoint, config, distributed
from invprop.collectives import Comm
from invprop.config import Config, ConfigError, slurm_section
from invprop.eval.knn_eval import evaluate_knn_world, evaluate_pixels_knn
from invprop.jobs.errors import fail
from invprop.jobs.rundir import FINISHED
from invprop.jobs.runlock import RunLock
from invprop.metrics import read_jsonl, write_json_atomic
from invprop.progress import Reporter
from invprop.results import RunResults
from invprop.train.boundary import StepBoundary
from invprop.train.trainer import Trainer

console = Console(stderr=True)




def finished(run_dir: Path) -> bool:
    """Whether pretraining ran to its last step and wrote its results (not just any results.json: the
    untrained baseline writes one before the first step)."""
    return (Path(run_dir) / FINISHED).exists()


def pretrain(run_dir: Path, evaluate: bool = True, stop_signals: tuple[signal.Signals, ...] = (),
             hold_run_dir: bool = False) -> RunResults:
    """Train (this rank's part) from the newest committed checkpoint if any, save, then optionally evaluate.

    On USR2 (or one of `stop_signals`, or at `train.stop_at_step`) the ranks save a committed checkpoint at
    the next step boundary and hand over to submitit (rank 0), which requeues the job; the requeued job lands
    here again and resumes from that step. The FINISHED marker is written last, when everything else is on disk.
    `hold_run_dir`: take the run directory's writer lock (a SLURM job; a local launch already holds it).
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = config.load_typed_run_config(run_dir / "config.yaml")
    env = distributed.read_env()
    comm = distributed.init(env, cfg.train.dist_timeout_s, rendezvous_dir=run_dir / "rendezvous")
    lock = _hold_run_dir(run_dir, env, comm) if hold_run_dir else None
    device = comm.device
    boundary = StepBoundary(comm, cfg.train.checkpoint_every_steps, cfg.train.checkpoint_every_min,
                            also=stop_signals, stop_at_step=cfg.train.stop_at_step)
    trainer = None
    try:
        trainer = Trainer(cfg, comm, run_dir)
        latest = checkpoint.latest(trainer.ckpt_root, report=env.is_main, states=trainer.states(), comm=comm)
        if env.is_main:
            (run_dir / FINISHED).unlink(missing_ok=True)  # until this attempt writes it again
        if latest is not None:
            trainer.restore(latest)
            if env.is_main:
                console.print(f"resumed from {latest} (epoch {trainer.position.epoch}, batch {trainer.position.batch}, "
                              f"step {trainer.state.step})", soft_wrap=True)
        else:
            # A fresh start: lines an earlier attempt wrote before its first checkpoint would repeat steps.
            trainer.metrics.truncate_after(-1)
            if cfg.eval.untrained_baseline:
                _untrained_baseline(cfg, trainer, device, env)
            if cfg.method.bank_init == "network":
                trainer.fill_bank_from_network()
        if not trainer.fit(boundary):
            return _preempted(trainer, boundary, env)
        trainer.save_checkpoint()
        digest = trainer.digest()
        results = RunResults()
        if env.is_main:
            losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
            results = RunResults(
                state_digest=digest, final_train_loss=losses[-1] if losses else float("nan"),
                epochs=cfg.train.epochs, images=trainer.n, steps=trainer.state.step, world_size=comm.world,
                dist_backend=comm.backend, train_wall_s=time.perf_counter() - start,
                slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                bank_selection=trainer.bank.selection_in_use, bank_selection_ms=dict(trainer.bank.tuning_ms),
                data_format=str(cfg.data.format), loader=trainer.source.name)
        if evaluate:
            results = results.merge(evaluate_knn_world(cfg, trainer.model, trainer.bank,
                                                       (trainer.images, trainer.labels),
                                                       trainer.test_split(),
                                                       report=Reporter(enabled=env.is_main)))
        if env.is_main:
            results.wall_s = time.perf_counter() - start
            results = results.write_into(run_dir)
            write_json_atomic(run_dir / FINISHED, {"step": trainer.state.step, "epochs": cfg.train.epochs,
                                                   "time": time.time()})
        return results
    finally:
        if trainer is not None:
            trainer.close()
        boundary.close()
        distributed.shutdown()
        if lock is not None:
            lock.release()


def _hold_run_dir(run_dir: Path, env: distributed.DistEnv, comm: Comm) -> RunLock | None:
    """A SLURM job's rank 0 holds the run directory for the job's life (a local launch holds it itself); when
    another writer has it, every rank stops with the holder's one line before anything is written."""
    lock, refused = None, ""
    if env.is_main:
        try:
            lock = RunLock(run_dir).acquire(f"SLURM job {os.environ.get('SLURM_JOB_ID', '?')}")
        except ConfigError as exc:
            refused = str(exc)
    (busy,) = comm.host_flags_any([bool(refused)])
    if busy:
        distributed.shutdown()
        raise ConfigError(refused or f"out_dir={run_dir} is in use by another writer (rank 0 says why)")
    return lock


def _untrained_baseline(cfg: Config, trainer: Trainer, device, env: distributed.DistEnv) -> None:
    """kNN of the network before any step and of the raw pixels, on the same reference set: the bars training
    has to clear."""
    found = evaluate_knn_world(cfg, trainer.model, trainer.bank, (trainer.images, trainer.labels),
                               trainer.test_split(), report=Reporter(enabled=env.is_main))
    pixels = evaluate_pixels_knn(cfg, trainer.bank, trainer.images, trainer.labels, trainer.test_split(), device)
    if env.is_main:
        RunResults().merge({"knn_untrained_top1": found["knn_top1"],
                            "knn_backbone_untrained_top1": found["knn_backbone_top1"], **pixels}
                           ).write_into(Path(trainer.run_dir))


def _preempted(trainer: Trainer, boundary: StepBoundary, env: distributed.DistEnv) -> RunResults:
    """The committed checkpoint is on disk; requeue through submitit (rank 0) or tell a local user to rerun."""
    if env.is_main:
        console.print(f"preempted: committed checkpoint at step {trainer.state.step}; handing over for requeue")
        boundary.hand_over()  # submitit's handler: checkpoint() + scontrol requeue + exit
        console.print("no scheduler to requeue this run: start the same command again to resume")
    elif env.source == "slurm":
        time.sleep(slurm_section(trainer.cfg).requeue_wait_s)  # rank 0's requeue ends this task
    return RunResults(preempted_at_step=trainer.state.step)


def pretrain_rank(rank: int, world: int, run_dir: str, evaluate: bool = True) -> None:
    """Entry for spawned local ranks (environment already set by spawn_ranks): a failure is one line."""
    try:
        # Ctrl-C: save at the next step like USR2
        pretrain(Path(run_dir), evaluate=evaluate, stop_signals=(signal.SIGINT,))
    except Exception as exc:  # noqa: BLE001 - the rank's top level
        print(f"rank {rank}:", end=" ", file=sys.stderr)
        fail(exc)
