"""Evaluation job body: load a run's newest committed checkpoint, run one protocol, merge into results.json."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from invprop import checkpoint
from invprop.bank import ShardedBank
from invprop.data import load_split
from invprop.eval.knn_eval import evaluate_knn
from invprop.eval.linear import linear_probe
from invprop.eval.semisup import semisup_eval
from invprop.jobs.pretrain import load_run_config
from invprop.metrics import update_results
from invprop.models import build_model
from invprop.progress import Reporter

PROTOCOLS = ("knn", "linear", "semisup")


def evaluate_run(run_dir: Path, protocol: str = "knn", report: Reporter | None = None) -> dict:
    """Run `protocol` (knn | linear | semisup) on the committed checkpoint, single process; its progress goes to
    `report` (default: stdout, a bar on a terminal, a line every 30 s in a job log)."""
    report = report or Reporter()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation {protocol!r}; expected one of {PROTOCOLS}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no committed checkpoint under {run_dir / 'checkpoints'}; did pretraining finish?")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model).to(device)
    checkpoint.load(latest, {"model": model})
    model.eval()
    images, labels = load_split(cfg.data, "train")
    if protocol == "knn":
        bank = ShardedBank(len(labels), int(cfg.model.embedding_dim), device=device)
        checkpoint.load(latest, {"bank": bank})  # every saved shard, whatever world size trained
        results = evaluate_knn(cfg, model, bank, images, labels, device, report=report)
    elif protocol == "linear":
        results = linear_probe(cfg, model, device, train_split=(images, labels), report=report)
    else:
        results = semisup_eval(cfg, model, device, run_dir, train_split=(images, labels), report=report)
    # per-protocol bookkeeping keys: concurrent evaluation jobs must not overwrite each other's
    results[f"eval_{protocol}_checkpoint"] = latest.name
    results[f"eval_{protocol}_wall_s"] = time.perf_counter() - start
    return update_results(run_dir, results)
