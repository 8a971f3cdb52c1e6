"""Stand-ins for the model and the optimiser in checkpoint benchmarks: replicated parts made of a dict of tensors."""

from __future__ import annotations

import torch


class Weights:
    """A replicated checkpoint part (state.pt) holding a dict of tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(state)
