"""The pretraining job body: one call per rank, the same under cluster=local, torchrun and SLURM."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from invprop import checkpoint, distributed
from invprop.eval.knn_eval import evaluate_knn
from invprop.metrics import read_jsonl, update_results
from invprop.train.trainer import Trainer


def load_run_config(run_dir: Path) -> DictConfig:
    return OmegaConf.load(Path(run_dir) / "config.yaml")


def pretrain(run_dir: Path, evaluate: bool = True) -> dict:
    """Train (this rank's part), save the final checkpoint, then optionally evaluate kNN; returns results."""
    start = time.perf_counter()
    cfg = load_run_config(run_dir)
    env = distributed.read_env()
    device = distributed.init(env, float(cfg.train.dist_timeout_s))
    try:
        trainer = Trainer(cfg, env, device, Path(run_dir))
        latest = checkpoint.latest(trainer.ckpt_root)
        if latest is not None:
            trainer.restore(latest)
        trainer.fit()
        trainer.save_checkpoint()
        digest = trainer.digest()
        results = {}
        if env.is_main:
            losses = [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]
            results = {"state_digest": digest, "final_train_loss": losses[-1] if losses else float("nan"),
                       "epochs": int(cfg.train.epochs), "images": trainer.n, "steps": trainer.state.step,
                       "world_size": env.world_size, "train_wall_s": time.perf_counter() - start}
        if evaluate:
            results.update(evaluate_knn(cfg, trainer.model, trainer.bank, trainer.images, trainer.labels, device))
        if env.is_main:
            results["wall_s"] = time.perf_counter() - start
            return update_results(Path(run_dir), results)
        return results
    finally:
        distributed.shutdown()


def pretrain_rank(rank: int, world: int, run_dir: str) -> None:
    """Entry for spawned local ranks (environment already set by spawn_ranks)."""
    pretrain(Path(run_dir))
