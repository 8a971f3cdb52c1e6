"""invprop: Invariance Propagation self-supervised training."""

import os

# OpenMP threads that spin while they wait collapse when the cores are shared (loader workers, several ranks on
# one machine, a second run): sleeping waiters trade a little speed on idle cores for that (tools/bench_omp_wait.py).
# Set before torch loads OpenMP (every entry point imports invprop first); an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from omegaconf import OmegaConf

# Config arithmetic used by configs/variant (e.g. warm-up T = epochs / 4); registered on import so every
# entry point that composes our configs has it.
OmegaConf.register_new_resolver("floor_div", lambda a, b: int(a) // int(b), replace=True)

# The config's types (invprop/config/schema.py), named by configs/ in their defaults lists.
from invprop.config.schema import register as _register_schemas  # noqa: E402

_register_schemas()
