"""Checks on the composed config, run before any work starts or any job is submitted.

Types and each section's own ranges are in the schema (invprop/config/schema.py); here are the checks that
need several sections or the data on disk. Every error is one line that names the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from invprop.config.checks import ConfigError, check_plain_text
from invprop.config.schema import (
    BANK_SELECTIONS,
    GROUP_SCHEMAS,
    Config,
    SlurmClusterConfig,
    TrainConfig,
    candidate_count,
)

__all__ = ["BANK_SELECTIONS", "Config", "ConfigError", "candidate_count", "compose_defaults", "group_section",
           "load_run_config", "load_typed_run_config", "slurm_section", "tool_data_section",
           "typed", "validate", "world_size"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def world_size(cfg: Config) -> int:
    return cfg.nodes * cfg.gpus


def group_section(group: str, option: str, **overrides: Any) -> DictConfig:
    """One group option's section as configs/<group>/<option>.yaml states it, typed by its schema, with
    `overrides` on top: for code and tests that need one section without composing a whole run."""
    stated = OmegaConf.load(CONFIGS / group / f"{option}.yaml")
    stated.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[group][option]), stated, overrides)


def tool_data_section(values: dict[str, Any]) -> DictConfig:
    """A data section for a tool's command-line values: `data=<name>` as configs/ states it with the values its
    schema has on top (None: not given, the YAML's value stays), or the values alone for a data set the trainer
    does not read (e.g. SVHN for a .beton)."""
    name = values["name"]
    schema = GROUP_SCHEMAS["data"].get(name)
    if schema is None:
        return OmegaConf.create(values)
    known = {f.name for f in dataclasses.fields(schema)}
    return group_section("data", name, **{k: v for k, v in values.items() if k in known and v is not None})


def compose_defaults(groups: dict[str, str] | None = None) -> DictConfig:
    """configs/config.yaml with its default group options, or those named in `groups`, typed like Hydra's
    composition, without Hydra's compose: for tools that build a run config in code."""
    stated = OmegaConf.load(CONFIGS / "config.yaml")
    chosen = {k: v for entry in stated.pop("defaults") if isinstance(entry, DictConfig) for k, v in entry.items()
              if k in GROUP_SCHEMAS}
    stated.pop("hydra", None)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), stated)
    for group, option in {**chosen, **(groups or {})}.items():
        cfg[group] = group_section(group, option)
    return cfg


def load_run_config(path: Path) -> DictConfig:
    """A run directory's config.yaml, typed: its values over today's configs/ for its group options, so a
    setting added since the run started reads as configs/ states it. A file these schemas cannot read (not
    written by invprop) comes back as written."""
    recorded = OmegaConf.load(path)
    try:
        groups = {"data": recorded.data.name, "model": recorded.model.arch, "method": recorded.method.name,
                  "cluster": recorded.cluster.name, "logger": recorded.logger.name}
        return OmegaConf.merge(compose_defaults(groups), recorded)
    except (KeyError, AttributeError, OmegaConfBaseException):
        return recorded


def load_typed_run_config(path: Path) -> Config:
    """A run directory's config.yaml as the schema objects components receive (interpolations resolved)."""
    return typed(load_run_config(path))


def slurm_section(cfg: Config | DictConfig) -> SlurmClusterConfig:
    """The run's cluster section when it is cluster=slurm; a sweep element that a Hydra launcher put on SLURM
    with cluster=local gets configs/cluster/slurm.yaml's values (the one place they are stated)."""
    if cfg.cluster.name == "slurm":
        return cfg.cluster
    section = OmegaConf.to_object(group_section("cluster", "slurm"))
    assert isinstance(section, SlurmClusterConfig)
    return section


def typed(cfg: DictConfig) -> Config:
    """The composed config as schema objects (interpolations resolved)."""
    conf = OmegaConf.to_object(cfg)
    if not isinstance(conf, Config):
        raise TypeError("validate() needs a config composed with its schema (configs/config.yaml)")
    return conf


def added_keys(node: Any, where: str = "") -> list[str]:
    """Keys a `+key=value` override added beyond the schema (Hydra lets `+` append to any section)."""
    found = []
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys() if isinstance(node, DictConfig) else ():
        name = f"{where}{key}"
        if known is not None and key not in known:
            found.append(name)
        elif isinstance(node._get_node(key), DictConfig):
            found += added_keys(node[key], name + ".")
    return found


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first value that cannot work."""
    extra = added_keys(cfg)
    if extra:
        raise ConfigError(f"{extra[0]} is not a setting of invprop; remove it or check its spelling against configs/")
    conf = typed(cfg)
    conf.validate()
    world = conf.nodes * conf.gpus
    batch = conf.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size={batch} must be divisible by nodes*gpus={world}; "
                          f"use a multiple of {world}")
    check_rank_batch(batch, world, conf.train)
    check_ranks_per_machine(conf.gpus, conf.cluster)
    n = _training_images(cfg.data)
    if batch > n:
        raise ConfigError(f"train.batch_size={batch} is larger than the {n} training images; lower it "
                          "or raise data.subset")
    conf.method.check_against_data(n)
    if conf.logger.name == "wandb":
        from invprop.logger import wandb_missing_message

        if wandb_missing_message():
            raise ConfigError(wandb_missing_message())
    _validate_out_dir(str(cfg.out_dir))


# BatchNorm's batch statistics over fewer images than this are too noisy to train on (per-GPU batches of 32 are
# what the ImageNet memory-bank recipes use); below it the user has to ask for it.
MIN_RANK_BATCH = 16
SUGGESTED_RANK_BATCH = 32


def check_rank_batch(batch: int, world: int, train: TrainConfig) -> None:
    """Refuse a per-rank batch under MIN_RANK_BATCH unless train.allow_small_rank_batch says it is meant."""
    per_rank = batch // world
    if per_rank >= MIN_RANK_BATCH or train.allow_small_rank_batch or world == 1:
        return
    suggested = SUGGESTED_RANK_BATCH * world
    lr = train.lr * suggested / 128
    raise ConfigError(f"train.batch_size={batch} puts {per_rank} images per rank through BatchNorm over "
                      f"nodes*gpus={world} ranks; use train.batch_size={suggested} ({SUGGESTED_RANK_BATCH} per rank; "
                      f"the lr then scales to {lr:g} = train.lr {train.lr:g} x {suggested}/128), add "
                      "model.sync_bn=true for statistics over the whole batch, or set "
                      "train.allow_small_rank_batch=true to run it anyway")


def machine_slots() -> tuple[int, str]:
    """(ranks this machine runs one each of, what they are): visible GPUs, else usable CPU cores."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        return gpus, f"{gpus} visible GPU(s)"
    cores = len(os.sched_getaffinity(0))
    return cores, f"no GPU and {cores} usable CPU core(s)"


def check_ranks_per_machine(gpus: int, cluster: Any) -> None:
    """Refuse more ranks per machine than it has GPUs (or CPU cores without one): they would share devices and
    run slower than fewer ranks, or not fit, unless cluster.allow_oversubscribe says it is meant."""
    if cluster.allow_oversubscribe:
        return
    if cluster.name == "slurm":  # the nodes are not this machine: what each is given is what the job asks for
        per_node = int(cluster.gpus_per_node)
        if per_node and gpus > per_node:
            raise ConfigError(f"gpus={gpus} ranks per node is more than the cluster.gpus_per_node={per_node} GPUs "
                              f"each node is given; use gpus={per_node} or fewer, or set "
                              "cluster.allow_oversubscribe=true to share them")
        return
    slots, what = machine_slots()
    if gpus > slots:
        raise ConfigError(f"gpus={gpus} starts {gpus} ranks on this machine, which has {what}; use gpus={slots} "
                          "or fewer, or set cluster.allow_oversubscribe=true to run them anyway")


def _training_images(data: DictConfig) -> int:
    """The training set's size after data.subset; for Fashion-MNIST the files are found and checked first."""
    from invprop.data import dataset_size, eval_split, fashion_mnist, num_classes  # torch: only when checking

    subset = int(data.subset)
    if data.name == "fashion_mnist":
        if data.resize_mode == "pad" and data.image_size < 28:
            raise ConfigError(f"data.image_size={data.image_size} is smaller than Fashion-MNIST's 28 pixels, "
                              "which data.resize_mode=pad cannot shrink; use >= 28 or data.resize_mode=resize")
        root = data.root
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
        raise ConfigError(text if text.startswith("data.") else f"data.name={data.name}: {text}") from None
    if classes < 2:
        raise ConfigError(f"data: {classes} class(es); classification needs at least 2")
    if data.name == "fashion_mnist":
        return min(n, stored["train"])
    return n


def _validate_out_dir(out: str) -> None:
    """out_dir must be a folder or creatable as one: not a file, not below a file, and writable; and plain text
    (it reaches the SLURM script's log paths)."""
    check_plain_text(out, "out_dir")
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
