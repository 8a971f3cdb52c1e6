"""A run's identity: the settings a resume cannot change (the model, the data and its subset, the method, the
global batch, the seed). The checkpoint's weights, bank and data position only mean something under them.

One dict, computed here from the config, is written to the run directory's identity.json by the launcher and
saved in every checkpoint; both are checked against this command's by `invprop.state.RunIdentity`. The world size is
not part of it: a run may continue on another number of ranks (the bank is resharded).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from invprop.config.flat import flatten
from invprop.config.schema import Config

# Whole sections, or single keys, that a resumed run must share with the run that wrote its checkpoints.
FIXED = ("model", "method", "data.name", "data.subset", "data.image_size", "data.resize_mode", "data.n_train",
         "data.n_test", "data.num_classes", "data.seed", "data.noise", "train.batch_size", "seed")


def run_identity(cfg: Config | DictConfig) -> dict[str, Any]:
    """The FIXED settings of `cfg` as dotted keys with plain values (what JSON and torch.save hold)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    flat = flatten(OmegaConf.to_container(node, resolve=True, enum_to_str=True))
    return {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in FIXED)}

