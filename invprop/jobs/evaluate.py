"""Evaluation job body: load a run's newest committed checkpoint and add its figures to results.json."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from invprop import checkpoint
from invprop.bank import ShardedBank
from invprop.data import load_split
from invprop.eval.knn_eval import evaluate_knn
from invprop.jobs.pretrain import load_run_config
from invprop.metrics import update_results
from invprop.models import build_model


def evaluate_run(run_dir: Path) -> dict:
    """weighted kNN over bank rows and recomputed features, single process, from the committed checkpoint."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no committed checkpoint under {run_dir / 'checkpoints'}; did pretraining finish?")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = checkpoint.load_state(latest)
    model = build_model(cfg.model).to(device)
    model.load_state_dict(state["model"])
    images, labels = load_split(cfg.data, "train")
    bank = ShardedBank(len(labels), int(cfg.model.embedding_dim), device=device)
    bank.rows = checkpoint.load_bank_shard(latest, len(labels), 0, 1).to(device)
    results = evaluate_knn(cfg, model, bank, images, labels, device)
    results["eval_checkpoint"] = latest.name
    results["eval_wall_s"] = time.perf_counter() - start
    return update_results(run_dir, results)
