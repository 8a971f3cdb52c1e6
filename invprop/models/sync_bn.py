"""BatchNorm whose training statistics cover the global batch of every rank (`model.sync_bn=true`).

On CUDA this is torch's own SyncBatchNorm. Its kernels (batch_norm_stats and friends) exist for GPUs only, so
CPU ranks (gloo: the test cluster, CPU users) get `GlobalBatchNorm2d`: the same statistics from one
differentiable all_reduce of each channel's sum, sum of squares and count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics over every rank of `group` in training; plain BatchNorm2d in eval."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() / c, dtype=xf.dtype, device=xf.device)
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
        # all_reduce from torch.distributed.nn is differentiable: the backward sums the ranks' gradients too
        total = dist_fn.all_reduce(local, group=self.group or dist.group.WORLD)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
            unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device,
                           group: dist.ProcessGroup | None = None) -> nn.Module:
    """Every BatchNorm2d of `model` made global: torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere.
    Weights, biases and running statistics carry over, so a checkpoint's state_dict keys are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    return _convert(model, group)


def _convert(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        out = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, group)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        out.running_mean.copy_(module.running_mean)
        out.running_var.copy_(module.running_var)
        out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module
