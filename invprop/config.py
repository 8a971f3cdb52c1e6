"""Checks on the composed config, run before any work starts or any job is submitted.

Every error is one line that names the field and says how to fix it.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

from invprop.data import dataset_size, eval_split, num_classes

# `bank.selection`: how each rank finds its exact local top-M (invprop/bank/select/ has one module per strategy).
BANK_SELECTIONS = ("auto", "topk", "bound", "filter", "triton")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def candidate_count(k: int, layers: int) -> int:
    """k + k^2 + ... + k^l: the candidates one anchor's propagation yields (concat, duplicates kept)."""
    return sum(k**i for i in range(1, layers + 1))


def world_size(cfg: DictConfig) -> int:
    return int(cfg.nodes) * int(cfg.gpus)


def n_background(cfg: DictConfig, n_train: int) -> int:
    """M: the configured value, or min(4096, N) when left null."""
    m = cfg.method.get("n_background")
    return min(4096, n_train) if m is None else int(m)


def _positive_int(value: Any, field: str, hint: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field}={value!r} must be a positive integer{hint}")
    return value


def _choice(value: Any, field: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(options)}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first value that cannot work."""
    _positive_int(cfg.nodes, "nodes", " (machines to run on)")
    _positive_int(cfg.gpus, "gpus", " (ranks per machine)")
    _positive_int(cfg.train.epochs, "train.epochs")
    batch = _positive_int(cfg.train.batch_size, "train.batch_size", " (the global batch)")
    world = world_size(cfg)
    if batch % world:
        raise ConfigError(f"train.batch_size={batch} must be divisible by nodes*gpus={world}; "
                          f"use a multiple of {world}")
    _choice(cfg.train.get("precision", "fp32"), "train.precision", ("fp32", "bf16"))
    _choice((cfg.get("bank") or {}).get("selection", "auto"), "bank.selection", BANK_SELECTIONS)
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr={cfg.train.lr} must be > 0")
    warm = cfg.train.get("lr_warmup_epochs", 0)
    if not isinstance(warm, int) or isinstance(warm, bool) or not 0 <= warm < cfg.train.epochs:
        raise ConfigError(f"train.lr_warmup_epochs={warm!r} must be an integer in [0, train.epochs)")
    if not isinstance(cfg.data.get("subset", 0), int) or cfg.data.get("subset", 0) < 0:
        raise ConfigError(f"data.subset={cfg.data.subset!r} must be >= 0 (0 = the whole training set)")
    try:
        n = dataset_size(cfg.data, "train")
        classes = num_classes(cfg.data)
        dataset_size(cfg.data, eval_split(cfg.data))  # the evaluation split must exist too
    except (ValueError, OSError) as exc:
        # names the field itself (data.root=..., data.name...) when it is about one; else say where it is
        text = str(exc)
        raise ConfigError(text if text.startswith("data.") else f"data.name={cfg.data.get('name')}: {text}"
                          ) from None
    if classes < 2:
        raise ConfigError(f"data: {classes} class(es); classification needs at least 2")
    if batch > n:
        raise ConfigError(f"train.batch_size={batch} is larger than the {n} training images; lower it "
                          "or raise data.subset")
    _validate_method(cfg.method, n)
    _validate_eval(cfg.eval)
    _validate_logger(cfg.get("logger"))
    out = str(cfg.out_dir)
    if os.path.isfile(out):
        raise ConfigError(f"out_dir={out} is a file; give a directory path")
    if cfg.cluster.name == "slurm":
        _validate_slurm(cfg.cluster)


def _validate_method(method: DictConfig, n: int) -> None:
    _choice(method.name, "method.name", ("invp", "npid"))
    if not method.tau > 0:
        raise ConfigError(f"method.tau={method.tau} must be > 0")
    if not 0 <= method.bank_momentum < 1:
        raise ConfigError(f"method.bank_momentum={method.bank_momentum} must be in [0, 1)")
    _choice(method.get("bank_init", "random"), "method.bank_init", ("random", "network"))
    if method.name == "npid":
        return
    k = _positive_int(method.k, "method.k", " (neighbours per graph row)")
    layers = _positive_int(method.l, "method.l", " (propagation layers)")
    if k >= n:
        raise ConfigError(f"method.k={k} must be smaller than the {n} training images")
    p = _positive_int(method.n_pos, "method.n_pos", " (hard positives P)")
    count = candidate_count(k, layers)
    if p > count:
        raise ConfigError(f"method.n_pos={p} is larger than the {count} candidates that k={k}, l={layers} "
                          "yield; lower method.n_pos or raise method.k / method.l")
    m = method.get("n_background")
    if m is not None:
        _positive_int(m, "method.n_background", " (background neighbours M)")
        if m > n:
            raise ConfigError(f"method.n_background={m} is larger than the {n} training images (M <= N); "
                              "lower it or leave it null for min(4096, N)")
        if m < 2:
            raise ConfigError("method.n_background must be >= 2 so the denominator without i is never empty")
    if method.lambda_inv < 0:
        raise ConfigError(f"method.lambda_inv={method.lambda_inv} must be >= 0")
    if method.warmup_epochs < 0:
        raise ConfigError(f"method.warmup_epochs={method.warmup_epochs} must be >= 0")
    _choice(method.propagation, "method.propagation", ("concat", "bfs"))
    _choice(method.positives, "method.positives", ("hard", "easy"))
    _choice(method.denominator, "method.denominator", ("code", "paper"))


def _validate_eval(ev: DictConfig) -> None:
    for protocol in ev.get("protocols", ["knn"]):
        _choice(protocol, "eval.protocols", ("knn", "linear", "semisup"))
    _positive_int(ev.knn_k, "eval.knn_k")
    _positive_int(ev.linear.epochs, "eval.linear.epochs")
    _positive_int(ev.linear.batch_size, "eval.linear.batch_size")
    _positive_int(ev.semisup.epochs, "eval.semisup.epochs")
    _positive_int(ev.semisup.batch_size, "eval.semisup.batch_size")
    for fraction in ev.semisup.fractions:
        if not 0 < fraction <= 1:
            raise ConfigError(f"eval.semisup.fractions has {fraction}; each must be in (0, 1]")
    _choice(ev.semisup.augment, "eval.semisup.augment", ("crop", "none"))


def _validate_logger(logger: DictConfig | None) -> None:
    from invprop.logger import LOGGERS, wandb_missing_message

    name = (logger or {}).get("name", "tensorboard")
    _choice(name, "logger", LOGGERS)
    if name == "wandb" and wandb_missing_message():
        raise ConfigError(wandb_missing_message())
    views = (logger or {}).get("views", 0)
    if not isinstance(views, int) or isinstance(views, bool) or views < 0:
        raise ConfigError(f"logger.views={views!r} must be an integer >= 0 (augmented views in the start grid)")


def _validate_slurm(cluster: DictConfig) -> None:
    _positive_int(cluster.timeout_min, "cluster.timeout_min", " (minutes)")
    _positive_int(cluster.cpus_per_task, "cluster.cpus_per_task")
    if cluster.signal_delay_s < 0:
        raise ConfigError(f"cluster.signal_delay_s={cluster.signal_delay_s} must be >= 0")
