"""Records the calls that would make the host wait for a GPU (a device-to-host read or a data-dependent shape),
so a CPU test can check that a training step has none. CUDA's own sync debug mode (tools/gpu/check.py) is the
check on a real GPU; this one sees Python-level calls only."""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Reads of values into Python, and ops whose output shape depends on the data.
_SYNCING = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__format__",
            "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "histc"}
# A tensor made from Python data on a GPU is a blocking copy from pageable memory: PyTorch waits for the stream.
_FROM_HOST_DATA = {"tensor", "as_tensor"}
# Indexing with a boolean mask is a nonzero() inside.
_MASK_INDEXED = {"__getitem__", "__setitem__", "index_put_", "index_put", "masked_scatter_"}


def _has_bool_index(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    if isinstance(value, (tuple, list)):
        return any(_has_bool_index(v) for v in value)
    return False


class SyncGuard(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _SYNCING:
            self.syncs.append(name)
        elif name == "repeat_interleave" and "output_size" not in (kwargs or {}) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):
            self.syncs.append(name)
        elif name in _MASK_INDEXED and len(args) > 1 and _has_bool_index(args[1]):
            self.syncs.append(f"{name}[bool mask]")
        elif name in _FROM_HOST_DATA and args and not isinstance(args[0], torch.Tensor):
            self.syncs.append(f"{name}(host data)")
        return func(*args, **(kwargs or {}))
