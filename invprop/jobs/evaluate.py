"""Evaluation job body: load a run's newest committed checkpoint, run one protocol, merge into results.json.

The same body runs on every rank of an evaluation world of eval.nodes x eval.gpus ranks: under cluster=local
as spawned processes (one rank: this process), under SLURM as the eval job's tasks (ranks from SLURM's
environment, like pretraining). Rank 0 alone writes results.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from invprop import checkpoint, config, distributed
from invprop.bank import ShardedBank
from invprop.collectives import Comm
from invprop.config.schema import Config
from invprop.data import eval_split, is_lazy, load_split
from invprop.eval.knn_eval import evaluate_knn_world
from invprop.eval.linear_world import linear_eval
from invprop.eval.readers import EvalReader
from invprop.eval.semisup_world import semisup_world
from invprop.jobs.errors import fail
from invprop.metrics import update_results, write_json_atomic
from invprop.models import build_model
from invprop.progress import Reporter

PROTOCOLS = ("knn", "linear", "semisup")


def eval_world(cfg: Config) -> tuple[int, int]:
    """(nodes, ranks per node) of the evaluation world; null means 1."""
    return cfg.eval.nodes or 1, cfg.eval.gpus or 1


STOPPED = "stopped.json"  # an evaluation stopped at a step boundary (its checkpoint committed) says where


def eval_root(run_dir: Path, protocol: str, evaluated: Path | None = None) -> Path:
    """Where `protocol`'s evaluation checkpoints go: one folder per pretraining checkpoint evaluated, so a
    newer pretraining checkpoint never resumes an evaluation of an older one."""
    root = Path(run_dir) / "eval" / protocol
    return root if evaluated is None else root / f"from_{evaluated.name}"


def evaluate_run(run_dir: Path, protocol: str = "knn", comm: Comm | None = None,
                 report: Reporter | None = None) -> dict:
    """Run `protocol` (knn | linear | semisup) on the committed checkpoint; every rank of `comm` (default: this
    process alone) calls it and gets the same results back. `report` tells the feature passes, epochs and
    steps (default: plain lines or a bar on stdout from the main rank, nothing from the others)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation {protocol!r}; expected one of {PROTOCOLS}")
    start = time.perf_counter()
    comm = comm or Comm()
    report = report if report is not None else Reporter(enabled=comm.is_main)
    run_dir = Path(run_dir)
    cfg = config.load_typed_run_config(run_dir / "config.yaml")
    if cfg.deterministic:
        from invprop.train.trainer import seed_everything

        seed_everything(cfg.seed, True)
    device = comm.device
    model = build_model(cfg.model).to(device)
    latest = checkpoint.latest(run_dir / "checkpoints", report=comm.is_main, states={"model": model}, comm=comm)
    if latest is None:
        raise FileNotFoundError(f"no committed checkpoint under {run_dir / 'checkpoints'}; did pretraining finish?")
    checkpoint.load(latest, {"model": model})
    model.eval()
    train_split = load_split(cfg.data, "train")
    reader = EvalReader.for_config(cfg.data, comm, is_lazy(train_split[0]))  # how the feature passes read pixels
    if protocol == "knn":
        bank = ShardedBank(len(train_split[1]), cfg.model.embedding_dim, comm=comm, device=device)
        checkpoint.load(latest, {"bank": bank})  # the saved shards overlapping this rank's rows
        results = evaluate_knn_world(cfg, model, bank, train_split, load_split(cfg.data, eval_split(cfg.data)),
                                     report, reader)
    elif protocol == "linear":
        # the test split is loaded only once the probe has chosen its lr (on held-out training images)
        results = linear_eval(cfg, model, comm, train_split, lambda: load_split(cfg.data, eval_split(cfg.data)),
                              root=eval_root(run_dir, protocol, latest), report=report, reader=reader)
    else:
        results = semisup_world(cfg, model, comm, run_dir, train_split, load_split(cfg.data, eval_split(cfg.data)),
                                root=eval_root(run_dir, protocol, latest), report=report, reader=reader)
    stopped = eval_root(run_dir, protocol) / STOPPED
    if "preempted_at_step" in results:
        if comm.is_main:
            write_json_atomic(stopped, results)
        return results
    if comm.is_main:  # done: a later evaluation (other settings perhaps) starts afresh
        shutil.rmtree(eval_root(run_dir, protocol), ignore_errors=True)
        with contextlib.suppress(OSError):  # the last protocol to finish removes eval/ (others may still use it)
            eval_root(run_dir, protocol).parent.rmdir()
    # per-protocol bookkeeping keys: concurrent evaluation jobs must not overwrite each other's
    results[f"eval_{protocol}_checkpoint"] = latest.name
    results[f"eval_{protocol}_wall_s"] = time.perf_counter() - start
    results[f"eval_{protocol}_world_size"] = comm.world
    # how often SLURM requeued this evaluation job before it finished (0 for cluster=local)
    results[f"eval_{protocol}_slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    results[f"eval_{protocol}_loader"] = reader.name
    merged = update_results(run_dir, results) if comm.is_main else {}
    return comm.gather_objects(merged)[0]  # rank 0's merged results on every rank


def evaluate_job(run_dir: Path, protocol: str) -> dict:
    """One rank of an evaluation world started by SLURM or spawn_ranks: join the world, evaluate, leave."""
    cfg = config.load_typed_run_config(Path(run_dir) / "config.yaml")
    env = distributed.read_env()
    comm = distributed.init(env, cfg.train.dist_timeout_s, rendezvous_dir=Path(run_dir) / "rendezvous")
    try:
        return evaluate_run(Path(run_dir), protocol, comm)
    finally:
        distributed.shutdown()


def evaluate_rank(rank: int, world: int, run_dir: str, protocol: str) -> None:
    """Entry for spawned local evaluation ranks: a failure is one line."""
    try:
        evaluate_job(Path(run_dir), protocol)
    except Exception as exc:  # noqa: BLE001 - the rank's top level
        print(f"rank {rank}:", end=" ", file=sys.stderr)
        fail(exc)


def evaluate_local(run_dir: Path, protocol: str, timeout_s: float = 3600.0) -> dict:
    """cluster=local: the evaluation world on this machine (eval.gpus spawned ranks; one rank: this process);
    returns results.json afterwards."""
    cfg = config.load_typed_run_config(Path(run_dir) / "config.yaml")
    nodes, ranks = eval_world(cfg)
    if nodes * ranks == 1:
        return evaluate_run(Path(run_dir), protocol)
    from invprop.jobs.spawn import spawn_ranks

    spawn_ranks(evaluate_rank, nodes * ranks, (str(run_dir), protocol), timeout_s=timeout_s,
                forward=(signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))
    stopped = eval_root(run_dir, protocol) / STOPPED
    if stopped.exists():
        return json.loads(stopped.read_text())
    return json.loads((Path(run_dir) / "results.json").read_text())
