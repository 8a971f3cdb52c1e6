"""What every Triton kernel of invprop shares: jitting a kernel function once, on a device it can run on, and the
block width over the embedding dimension. Importing this module needs Triton."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton

_COMPILED: dict[str, Any] = {}


def jit_for(fn: Callable[..., None], device: torch.device) -> Any:
    """`fn` as a Triton kernel. Triton picks compiled or interpreted when it is first imported: CPU tensors need
    TRITON_INTERPRET=1 in the environment by then (tests/conftest.py sets it on a machine without CUDA)."""
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise RuntimeError("invprop's Triton kernels run on CUDA tensors, or on the CPU in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before Triton is first imported")
    key = f"{fn.__module__}.{fn.__name__}"
    if key not in _COMPILED:
        _COMPILED[key] = triton.jit(fn)
    return _COMPILED[key]


def block_d_for(dim: int) -> int:
    """A power-of-two block over D, 16 to 128 wide."""
    return min(128, max(16, triton.next_power_of_2(dim)))
