"""The config's schema: one dataclass per section, registered in Hydra's ConfigStore.

Values are stated once, in configs/ (each group's YAML lists `<option>_schema` first in its defaults); these
classes state each key's type and nothing else, so composing refuses a key the schema lacks and a value of the
wrong type, and code reads every key without a fallback of its own. `validate()` on each section checks what
a type cannot say (ranges, choices); checks that span sections are in invprop/config/__init__.py.
tests/test_config_schema.py keeps the YAML and these classes to the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from invprop.config.checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_plain_text,
    check_positive_int,
)
from invprop.config.data_schema import (
    DataConfig,
    ImageFolderConfig,
    SmallImagesConfig,
    SyntheticConfig,
)

# `bank.selection`: how each rank finds its exact local top-M (invprop/bank/select/ has one module per strategy).
BANK_SELECTIONS = ("auto", "topk", "bound", "filter", "triton")
LOGGERS = ("tensorboard", "wandb", "none")
EVAL_PROTOCOLS = ("knn", "linear", "semisup")


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    lr_warmup_epochs: int
    momentum: float
    weight_decay: float
    num_workers: int
    log_every: int
    dist_timeout_s: float
    checkpoint_every_steps: int
    checkpoint_every_min: float
    keep_checkpoints: int
    precision: str
    channels_last: bool
    compile: bool
    stop_at_step: int | None
    allow_small_rank_batch: bool  # a per-rank batch under 16 is refused unless this says it is meant

    def validate(self) -> None:
        check_positive_int(self.epochs, "train.epochs")
        check_positive_int(self.batch_size, "train.batch_size", " (the global batch)")
        check_choice(self.precision, "train.precision", ("fp32", "bf16"))
        check_bool(self.allow_small_rank_batch, "train.allow_small_rank_batch")
        check_number(self.lr, "train.lr", 0, low_open=True)
        check_number(self.momentum, "train.momentum", 0, 1, high_open=True)
        check_number(self.weight_decay, "train.weight_decay", 0)
        check_int(self.num_workers, "train.num_workers", 0, " (loader processes per rank)")
        check_positive_int(self.log_every, "train.log_every", " (steps between metrics lines)")
        check_number(self.dist_timeout_s, "train.dist_timeout_s", 0, low_open=True)
        check_int(self.checkpoint_every_steps, "train.checkpoint_every_steps", 0, " (0 = off)")
        check_number(self.checkpoint_every_min, "train.checkpoint_every_min", 0)
        check_positive_int(self.keep_checkpoints, "train.keep_checkpoints",
                           " (the checkpoint just written is always kept)")
        if self.stop_at_step is not None:
            check_positive_int(self.stop_at_step, "train.stop_at_step",
                               " (the step to stop at as if preempted) or null")
        if not 0 <= self.lr_warmup_epochs < self.epochs:
            raise ConfigError(f"train.lr_warmup_epochs={self.lr_warmup_epochs!r} must be an integer in "
                              "[0, train.epochs)")


@dataclass
class BankConfig:
    selection: str

    def validate(self) -> None:
        check_choice(self.selection, "bank.selection", BANK_SELECTIONS)


@dataclass
class LinearProbeConfig:
    mode: str  # features: precomputed features (small data sets) | online: fresh crops through the backbone
    epochs: int
    lrs: list[float]  # one head per lr, trained side by side; the best on the held-out rows is reported
    val_fraction: float  # of each class of the TRAINING split, held out to choose the lr (0: lrs has one)
    schedule: str  # cosine (to 0 over all steps) | step (x gamma at each of `milestones`, in epochs)
    milestones: list[int]
    gamma: float
    batch_size: int
    weight_decay: float
    momentum: float
    aug_views: int  # features mode: extra seeded cropped views, featured once
    crop_scale: list[float]  # online mode: RandomResizedCrop's area range
    seed: int

    def validate(self) -> None:
        check_choice(self.mode, "eval.linear.mode", ("features", "online"))
        check_choice(self.schedule, "eval.linear.schedule", ("cosine", "step"))
        check_positive_int(self.epochs, "eval.linear.epochs")
        check_positive_int(self.batch_size, "eval.linear.batch_size")
        if not self.lrs:
            raise ConfigError("eval.linear.lrs is empty; give at least one learning rate, e.g. [0.1]")
        for lr in self.lrs:
            check_number(lr, "eval.linear.lrs", 0, low_open=True)
        check_number(self.val_fraction, "eval.linear.val_fraction", 0, 1, high_open=True)
        if self.val_fraction == 0 and len(self.lrs) > 1:
            raise ConfigError(f"eval.linear.lrs={list(self.lrs)} needs held-out training images to choose among "
                              "them; set eval.linear.val_fraction > 0 (e.g. 0.1) or give one lr")
        check_number(self.gamma, "eval.linear.gamma", 0, low_open=True)
        check_int(self.aug_views, "eval.linear.aug_views", 0)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"eval.linear.crop_scale={list(self.crop_scale)} must be [low, high] with "
                              "0 < low <= high <= 1")


@dataclass
class SemisupConfig:
    fractions: list[float]
    epochs: int
    milestones: list[int]
    milestones_epochs: int
    gamma: float
    lr: float
    classifier_lr_mult: float
    batch_size: int
    weight_decay: float
    momentum: float
    augment: str
    crop_scale: list[float]
    seed: int
    # {fraction tag: list file} or null. Any: OmegaConf cannot merge a mapping into a typed Optional dict
    # that is null, which is how a user sets this key.
    subset_files: Any

    def validate(self) -> None:
        check_positive_int(self.epochs, "eval.semisup.epochs")
        check_positive_int(self.batch_size, "eval.semisup.batch_size")
        for fraction in self.fractions:
            if not 0 < fraction <= 1:
                raise ConfigError(f"eval.semisup.fractions has {fraction}; each must be in (0, 1]")
        check_choice(self.augment, "eval.semisup.augment", ("crop", "none"))
        files = self.subset_files
        if files is not None and (not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values())):
            raise ConfigError(f"eval.semisup.subset_files={files!r} must be null or {{tag: list file}}, e.g. "
                              "{1pct: /data/1percent.txt}")


@dataclass
class EvalTimeouts:
    """Minutes per SLURM job for each protocol; null: cluster.eval_timeout_min."""

    knn: int | None
    linear: int | None
    semisup: int | None


@dataclass
class EvalConfig:
    protocols: list[str]
    untrained_baseline: bool
    knn_k: int
    knn_sigma: float
    batch_size: int
    every_epochs: int
    every_epochs_test_images: int
    linear: LinearProbeConfig
    semisup: SemisupConfig
    # The evaluation world: eval.nodes x eval.gpus ranks (null: 1 node, 1 rank)
    nodes: int | None
    gpus: int | None
    checkpoint_every_steps: int  # linear / semisup: a committed evaluation checkpoint every n steps (0 = off)
    stop_at_step: int | None  # linear / semisup: stop as if preempted at this step (drills and tests)
    timeout_min: EvalTimeouts

    def validate(self) -> None:
        for protocol in EVAL_PROTOCOLS:
            minutes = getattr(self.timeout_min, protocol)
            if minutes is not None:
                check_positive_int(minutes, f"eval.timeout_min.{protocol}", " (minutes) or null")
        if self.nodes is not None:
            check_positive_int(self.nodes, "eval.nodes", " (machines the evaluation runs on) or null")
        if self.gpus is not None:
            check_positive_int(self.gpus, "eval.gpus", " (evaluation ranks per machine) or null")
        check_int(self.checkpoint_every_steps, "eval.checkpoint_every_steps", 0, " (0 = off)")
        if self.stop_at_step is not None:
            check_positive_int(self.stop_at_step, "eval.stop_at_step", " (the step to stop at as if preempted) or null")
        for protocol in self.protocols:
            check_choice(protocol, "eval.protocols", EVAL_PROTOCOLS)
        check_positive_int(self.knn_k, "eval.knn_k")
        check_number(self.knn_sigma, "eval.knn_sigma", 0, low_open=True)
        check_positive_int(self.batch_size, "eval.batch_size")
        check_int(self.every_epochs, "eval.every_epochs", 0, " (0 = off)")
        check_positive_int(self.every_epochs_test_images, "eval.every_epochs_test_images")
        self.linear.validate()
        self.semisup.validate()


def candidate_count(k: int, layers: int) -> int:
    """k + k^2 + ... + k^l: the candidates one anchor's propagation yields (concat, duplicates kept)."""
    return sum(k**i for i in range(1, layers + 1))


# --- groups (the data group's schemas are in data_schema.py) --------------------------------------------------

@dataclass
class ModelConfig:
    arch: str
    head: str
    embedding_dim: int
    hidden_dim: int | None
    sync_bn: bool  # BatchNorm statistics over the global batch (SyncBatchNorm) instead of each rank's part

    def validate(self) -> None:
        from invprop.models.resnet import BACKBONES

        check_bool(self.sync_bn, "model.sync_bn")
        check_positive_int(self.embedding_dim, "model.embedding_dim", " (the embedding's size)")
        check_choice(self.arch, "model.arch", tuple(sorted(BACKBONES)))
        check_choice(self.head, "model.head", ("linear", "mlp"))
        if self.hidden_dim is not None:
            check_positive_int(self.hidden_dim, "model.hidden_dim", " (or null)")


class MethodName(StrEnum):
    """`method.name`: the training objective (invprop/method.py has what each one needs)."""

    invp = "invp"
    npid = "npid"


@dataclass
class MethodConfig:
    """NPID: instance discrimination against the memory bank."""

    name: MethodName
    tau: float
    bank_momentum: float
    bank_init: str
    # InvP's epochs before L_inv switches on; NPID has no L_inv and ignores it. Shared so that an experiment
    # tuning InvP's warm-up still sweeps over `+variant=npid`.
    warmup_epochs: int

    def validate(self) -> None:
        check_int(self.warmup_epochs, "method.warmup_epochs", 0)
        check_number(self.tau, "method.tau", 0, low_open=True)
        check_number(self.bank_momentum, "method.bank_momentum", 0, 1, high_open=True)
        check_choice(self.bank_init, "method.bank_init", ("random", "network"))

    def check_against_data(self, n: int) -> None:
        """Checks that need the training set's size N (none for NPID)."""


@dataclass
class InvpConfig(MethodConfig):
    k: int
    l: int  # noqa: E741 - the paper's name for the propagation depth
    n_pos: int
    n_background: int | None
    lambda_inv: float
    propagation: str
    edges: str
    positives: str
    denominator: str

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.k, "method.k", " (neighbours per graph row)")
        check_positive_int(self.l, "method.l", " (propagation layers)")
        check_positive_int(self.n_pos, "method.n_pos", " (hard positives P)")
        if self.n_background is not None:
            check_positive_int(self.n_background, "method.n_background", " (background neighbours M)")
        check_number(self.lambda_inv, "method.lambda_inv", 0)
        check_choice(self.propagation, "method.propagation", ("concat", "bfs"))
        check_choice(self.edges, "method.edges", ("all", "mutual"))
        check_choice(self.positives, "method.positives", ("hard", "easy"))
        check_choice(self.denominator, "method.denominator", ("code", "paper"))

    def check_against_data(self, n: int) -> None:
        if self.k >= n:
            raise ConfigError(f"method.k={self.k} must be smaller than the {n} training images")
        count = candidate_count(self.k, self.l)
        if self.n_pos > count:
            raise ConfigError(f"method.n_pos={self.n_pos} is larger than the {count} candidates that k={self.k}, "
                              f"l={self.l} yield; lower method.n_pos or raise method.k / method.l")
        m = self.n_background
        if m is not None:
            if m > n:
                raise ConfigError(f"method.n_background={m} is larger than the {n} training images (M <= N); "
                                  "lower it or leave it null for min(4096, N)")
            if m < 2:
                raise ConfigError("method.n_background must be >= 2 so the denominator without i is never empty")


@dataclass
class LocalClusterConfig:
    name: str
    run_timeout_h: float
    allow_oversubscribe: bool   # more ranks than this machine's usable CPU cores / visible GPUs

    def validate(self) -> None:
        check_number(self.run_timeout_h, "cluster.run_timeout_h", 0, low_open=True)


@dataclass
class SlurmClusterConfig:
    name: str
    timeout_min: int
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    signal_delay_s: int
    max_num_timeout: int
    cpus_per_task: int
    mem_gb: int
    gpus_per_node: int
    additional_parameters: dict[str, Any]
    eval_timeout_min: int
    requeue_wait_s: float
    allow_oversubscribe: bool   # more ranks per node than cluster.gpus_per_node GPUs

    def validate(self) -> None:
        check_positive_int(self.timeout_min, "cluster.timeout_min", " (minutes)")
        check_positive_int(self.cpus_per_task, "cluster.cpus_per_task")
        check_number(self.signal_delay_s, "cluster.signal_delay_s", 0)
        check_int(self.gpus_per_node, "cluster.gpus_per_node", 0)
        check_positive_int(self.eval_timeout_min, "cluster.eval_timeout_min", " (minutes)")
        check_number(self.requeue_wait_s, "cluster.requeue_wait_s", 0)
        for key in ("partition", "account", "qos", "constraint"):
            check_plain_text(getattr(self, key), f"cluster.{key}")
        for key, value in (self.additional_parameters or {}).items():
            check_plain_text(str(key), "cluster.additional_parameters")
            check_plain_text(str(value), f"cluster.additional_parameters.{key}")


@dataclass
class LoggerConfig:
    name: str

    def validate(self) -> None:
        check_choice(self.name, "logger", LOGGERS)


@dataclass
class ImageLoggerConfig(LoggerConfig):
    views: int   # augmented views in the grid logged at the first step (0 = none)

    def validate(self) -> None:
        super().validate()
        check_int(self.views, "logger.views", 0, " (augmented views in the start grid)")


@dataclass
class TensorBoardConfig(ImageLoggerConfig):
    dir: str


@dataclass
class WandbConfig(ImageLoggerConfig):
    project: str


@dataclass
class Config:
    """The whole config; the groups' nodes get their own schema from the option chosen."""

    seed: int
    deterministic: bool
    out_dir: str
    nodes: int
    gpus: int
    train: TrainConfig
    bank: BankConfig
    eval: EvalConfig
    data: Any = MISSING
    model: Any = MISSING
    method: Any = MISSING
    cluster: Any = MISSING
    logger: Any = MISSING

    def validate(self) -> None:
        check_positive_int(self.nodes, "nodes", " (machines to run on)")
        check_positive_int(self.gpus, "gpus", " (ranks per machine)")
        if self.cluster.name == "local" and self.nodes > 1:
            raise ConfigError(f"nodes={self.nodes} with cluster=local: a local run has this one machine; use "
                              f"gpus={self.nodes * self.gpus} for as many ranks here, or cluster=slurm")
        if self.cluster.name == "local" and (self.eval.nodes or 1) > 1:
            raise ConfigError(f"eval.nodes={self.eval.nodes} with cluster=local: a local evaluation has this one "
                              "machine; use eval.gpus for more ranks here, or cluster=slurm")
        check_int(self.seed, "seed", 0)
        if self.seed >= 2**32:  # numpy's and the data order's generators take 32-bit seeds
            raise ConfigError(f"seed={self.seed} must be below 2^32 (4294967296)")
        for section in (self.train, self.bank, self.model, self.data, self.method, self.eval, self.logger,
                        self.cluster):
            section.validate()


# (group, option) -> schema; the option's YAML names `<option>_schema` first in its defaults list.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "data": {"fashion_mnist": SmallImagesConfig, "synthetic": SyntheticConfig, "cifar10": DataConfig,
             "cifar100": DataConfig, "imagenet": ImageFolderConfig, "folder": ImageFolderConfig},
    "model": {"resnet_tiny": ModelConfig, "resnet18_cifar": ModelConfig, "resnet50": ModelConfig},
    "method": {"invp": InvpConfig, "npid": MethodConfig},
    "cluster": {"local": LocalClusterConfig, "slurm": SlurmClusterConfig},
    "logger": {"tensorboard": TensorBoardConfig, "wandb": WandbConfig, "none": LoggerConfig},
}


def field_names(schema: type) -> set[str]:
    return {f.name for f in fields(schema)}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent): `config_schema` for the primary config and
    `<option>_schema` in each group."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, options in GROUP_SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"{option}_schema", node=schema)


