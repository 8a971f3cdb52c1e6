"""sha256 over model weights, bank and neighbour table: two runs are equal iff their digests are."""

from __future__ import annotations

import hashlib

import torch


def state_digest(model_state: dict[str, torch.Tensor], bank: torch.Tensor, graph: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for name in sorted(model_state):
        tensor = model_state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    h.update(bank.detach().cpu().contiguous().float().numpy().tobytes())
    if graph is not None:
        h.update(graph.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()
