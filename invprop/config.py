"""Checks on the composed config, run before any work starts or any job is submitted.

Every error is one line that names the field and says how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from invprop.data import dataset_size, eval_split, fashion_mnist, num_classes
from invprop.models.resnet import BACKBONES

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


def _int(value: Any, field: str, minimum: int, hint: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{field}={value!r} must be an integer >= {minimum}{hint}")
    return value


def _number(value: Any, field: str, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> float:
    """A real number in the given range; the message spells the range as an interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{field}={value!r} must be a number in {'(' if low_open or low is None else '['}{lo}, "
                          f"{hi}{')' if high_open or high is None else ']'}")
    return float(value)


def _bool(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be true or false")


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
    _int(cfg.seed, "seed", 0)
    _bool(cfg.deterministic, "deterministic")
    _validate_train(cfg.train)
    _choice((cfg.get("bank") or {}).get("selection", "auto"), "bank.selection", BANK_SELECTIONS)
    _positive_int(cfg.model.embedding_dim, "model.embedding_dim", " (the embedding's size)")
    _choice(cfg.model.arch, "model.arch", tuple(sorted(BACKBONES)))
    _choice(cfg.model.get("head", "linear"), "model.head", ("linear", "mlp"))
    if cfg.model.get("hidden_dim") is not None:
        _positive_int(cfg.model.hidden_dim, "model.hidden_dim", " (or null)")
    n = _validate_data(cfg.data)
    warm = cfg.train.get("lr_warmup_epochs", 0)
    if not isinstance(warm, int) or isinstance(warm, bool) or not 0 <= warm < cfg.train.epochs:
        raise ConfigError(f"train.lr_warmup_epochs={warm!r} must be an integer in [0, train.epochs)")
    if batch > n:
        raise ConfigError(f"train.batch_size={batch} is larger than the {n} training images; lower it "
                          "or raise data.subset")
    _validate_method(cfg.method, n)
    _validate_eval(cfg.eval)
    _validate_logger(cfg.get("logger"))
    _validate_out_dir(str(cfg.out_dir))
    if cfg.cluster.name == "slurm":
        _validate_slurm(cfg.cluster)


def _validate_train(train: DictConfig) -> None:
    _choice(train.get("precision", "fp32"), "train.precision", ("fp32", "bf16"))
    _number(train.lr, "train.lr", 0, low_open=True)
    _number(train.momentum, "train.momentum", 0, 1, high_open=True)
    _number(train.weight_decay, "train.weight_decay", 0)
    _int(train.num_workers, "train.num_workers", 0, " (loader processes per rank)")
    _positive_int(train.log_every, "train.log_every", " (steps between metrics lines)")
    _number(train.dist_timeout_s, "train.dist_timeout_s", 0, low_open=True)
    _int(train.get("checkpoint_every_steps", 0) or 0, "train.checkpoint_every_steps", 0, " (0 = off)")
    _number(train.get("checkpoint_every_min", 0) or 0, "train.checkpoint_every_min", 0)
    _positive_int(train.get("keep_checkpoints", 3), "train.keep_checkpoints",
                  " (the checkpoint just written is always kept)")
    if train.get("stop_at_step") is not None:
        _positive_int(train.stop_at_step, "train.stop_at_step", " (the step to stop at as if preempted) or null")
    for flag in ("channels_last", "compile"):
        _bool(train.get(flag, False), f"train.{flag}")


def _validate_data(data: DictConfig) -> int:
    """The training set's size after data.subset; for Fashion-MNIST the files are found and checked first."""
    subset = _int(data.get("subset", 0) or 0, "data.subset", 0, " (0 = the whole training set)")
    _choice(data.get("format", "torchvision"), "data.format", ("ffcv", "torchvision"))
    _choice(data.get("resize_mode", "pad"), "data.resize_mode", ("pad", "resize"))
    size = _int(data.get("image_size", 32), "data.image_size", 8, " (pixels per side)")
    _validate_augment(data.get("augment") or {})
    if data.name == "synthetic":
        _positive_int(data.get("n_train", 2000), "data.n_train")
        _positive_int(data.get("n_test", 500), "data.n_test")
        _int(data.get("num_classes", 10), "data.num_classes", 2)
    if data.name == "fashion_mnist":
        if data.get("resize_mode", "pad") == "pad" and size < 28:
            raise ConfigError(f"data.image_size={size} is smaller than Fashion-MNIST's 28 pixels, which "
                              "data.resize_mode=pad cannot shrink; use >= 28 or data.resize_mode=resize")
        root = data.get("root")
        if root is not None and not os.path.isdir(str(root)):
            raise ConfigError(f"data.root={root} is not a folder; point it at the folder with the IDX files "
                              "(or null for Debian's dataset-fashion-mnist)")
        try:
            stored = {split: fashion_mnist.check_split(split, root) for split in ("train", "test")}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.root: {exc}") from None
        if subset > stored["train"]:
            raise ConfigError(f"data.subset={subset} is larger than the {stored['train']} training images; "
                              f"use at most {stored['train']} (0 = all)")
    try:
        n = dataset_size(data, "train")
        classes = num_classes(data)
        dataset_size(data, eval_split(data))  # the evaluation split must exist too
    except (ValueError, OSError) as exc:
        # names the field itself (data.root=..., data.name...) when it is about one; else say where it is
        text = str(exc)
        raise ConfigError(text if text.startswith("data.") else f"data.name={data.get('name')}: {text}") from None
    if classes < 2:
        raise ConfigError(f"data: {classes} class(es); classification needs at least 2")
    if data.name == "fashion_mnist":
        return min(n, stored["train"])
    return n


def _validate_augment(aug: Any) -> None:
    scale = aug.get("crop_scale", (0.2, 1.0))
    if (not isinstance(scale, Sequence) or isinstance(scale, str) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            or not 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"data.augment.crop_scale={list(scale) if isinstance(scale, Sequence) else scale!r} "
                          "must be [low, high] with 0 < low <= high <= 1 (shares of the image area)")
    for key in ("brightness", "contrast", "saturation"):
        _number(aug.get(key, 0.0), f"data.augment.{key}", 0)
    _number(aug.get("hue", 0.0), "data.augment.hue", 0, 0.5)
    for key in ("jitter_p", "grayscale_p", "blur_p"):
        _number(aug.get(key, 0.0), f"data.augment.{key}", 0, 1)
    _bool(aug.get("flip", False), "data.augment.flip")


def _validate_out_dir(out: str) -> None:
    """out_dir must be a folder or creatable as one: not a file, not below a file, and writable."""
    path = os.path.abspath(out)
    if os.path.isfile(path):
        raise ConfigError(f"out_dir={out} is a file; give a directory path")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"out_dir={out} is below the file {parent}; give a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir={out}: {parent} is not writable; choose an out_dir you can write to")


def _validate_method(method: DictConfig, n: int) -> None:
    _choice(method.name, "method.name", ("invp", "npid"))
    _number(method.tau, "method.tau", 0, low_open=True)
    _number(method.bank_momentum, "method.bank_momentum", 0, 1, high_open=True)
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
    _number(method.lambda_inv, "method.lambda_inv", 0)
    _int(method.warmup_epochs, "method.warmup_epochs", 0)
    _choice(method.propagation, "method.propagation", ("concat", "bfs"))
    _choice(method.positives, "method.positives", ("hard", "easy"))
    _choice(method.denominator, "method.denominator", ("code", "paper"))


def _validate_eval(ev: DictConfig) -> None:
    for protocol in ev.get("protocols", ["knn"]):
        _choice(protocol, "eval.protocols", ("knn", "linear", "semisup"))
    _positive_int(ev.knn_k, "eval.knn_k")
    _number(ev.get("knn_sigma", 0.07), "eval.knn_sigma", 0, low_open=True)
    _positive_int(ev.get("batch_size", 512), "eval.batch_size")
    _int(ev.get("every_epochs", 0) or 0, "eval.every_epochs", 0, " (0 = off)")
    _bool(ev.get("untrained_baseline", False), "eval.untrained_baseline")
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
    _number(cluster.signal_delay_s, "cluster.signal_delay_s", 0)
    _int(cluster.get("gpus_per_node") or 0, "cluster.gpus_per_node", 0)
