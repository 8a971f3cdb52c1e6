"""invprop: Invariance Propagation self-supervised training."""

from omegaconf import OmegaConf

# Config arithmetic used by configs/variant (e.g. warm-up T = epochs / 4); registered on import so every
# entry point that composes our configs has it.
OmegaConf.register_new_resolver("floor_div", lambda a, b: int(a) // int(b), replace=True)

# The config's types (invprop/config/schema.py), named by configs/ in their defaults lists.
from invprop.config.schema import register as _register_schemas  # noqa: E402

_register_schemas()
