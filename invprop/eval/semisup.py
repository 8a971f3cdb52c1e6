"""Semi-supervised fine-tuning on 1% / 10% of the labels (docs/DESIGN.md, "Evaluation protocols"): the parts
the evaluation world's fine-tune (invprop/eval/semisup_world.py) is built from.

The whole network (a copy of the backbone plus a new linear classifier) is trained with SGD on a per-class
balanced label subset (see :mod:`invprop.eval.subsets`), the classifier with ``classifier_lr_mult`` times the
backbone's learning rate; the rate drops by ``gamma`` at each milestone epoch (30 epochs, steps at 15/20/25
by default; invprop/schedules.py). Training images get a per-sample random resized crop on the CPU
(``augment: crop``) or none.
"""

from __future__ import annotations

import torch
from torch import nn

from invprop.data import eval_batches
from invprop.progress import Tracker


def finetune_optimizer(net: FineTuneNet, lr: float, classifier_lr_mult: float, momentum: float,
                       weight_decay: float) -> torch.optim.SGD:
    """SGD over the whole network; the new classifier's lr is ``classifier_lr_mult`` times the backbone's.
    Each group keeps its ``base_lr`` for the schedule."""
    head_lr = lr * float(classifier_lr_mult)
    return torch.optim.SGD([{"params": net.backbone.parameters(), "lr": lr, "base_lr": lr},
                            {"params": net.classifier.parameters(), "lr": head_lr, "base_lr": head_lr}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay)


class FineTuneNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def _normalise(x: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255).sub_(mean_t).div_(std_t)


@torch.no_grad()
def _logits(net: nn.Module, images: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor,
            device: torch.device, batch_size: int, progress: Tracker | None = None) -> torch.Tensor:
    net.eval()
    out = []
    for batch in eval_batches(images, batch_size):
        out.append(net(_normalise(batch.to(device), mean_t, std_t)).float())
        if progress is not None:
            progress.advance(batch.shape[0])
    return torch.cat(out)
