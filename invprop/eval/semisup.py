"""Semi-supervised fine-tuning on 1% / 10% of the labels (docs/DESIGN.md, "Evaluation protocols").

The whole network (a copy of the backbone plus a new linear classifier) is trained with SGD on a per-class
balanced label subset (see :mod:`invprop.eval.subsets`), the classifier with ``classifier_lr_mult`` times the
backbone's learning rate; the rate drops by ``gamma`` at each milestone epoch (30 epochs, steps at 15/20/25
by default). Training images get a per-sample random resized crop on the CPU (``augment: crop``) or none.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from invprop.data import eval_batches, eval_split, load_split, materialize, normalization, num_classes
from invprop.data.seeding import derive_seed
from invprop.eval.linear import crop_batch, eval_section, topk_accuracy
from invprop.eval.subsets import fraction_tag, load_or_create_subset
from invprop.progress import SILENT, Reporter, Tracker


def scaled_milestones(milestones: list[float], written_for: float | None, epochs: int) -> list[float]:
    """Milestones (in epochs) stretched from a ``written_for``-epoch schedule to ``epochs``; unchanged when
    ``written_for`` is null/0 or equal to ``epochs``. The result may be fractional (applied per step)."""
    if not written_for or float(written_for) == float(epochs):
        return sorted(float(m) for m in milestones)
    return sorted(float(m) * epochs / float(written_for) for m in milestones)


def lr_factor(progress: float, milestones: list[float], gamma: float) -> float:
    """Step schedule: ``gamma`` to the number of milestones reached at ``progress`` (epochs, fractional)."""
    return gamma ** sum(1 for m in milestones if m <= progress)


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


def finetune_subset(cfg: Any, model: nn.Module, device: torch.device, run_dir: Path, fraction: float, *,
                    train_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                    test_split: tuple[torch.Tensor, torch.Tensor] | None = None, report: Reporter = SILENT,
                    **overrides: Any) -> dict[str, float]:
    """Fine-tune a copy of ``model.backbone`` + a new classifier on the ``fraction`` label subset of the run
    (list file reused if present) and return ``semisup_<pct>_top1`` / ``_top5`` (0..1) on the test split.

    Settings come from ``cfg.eval.semisup``; ``overrides`` (same names) win,
    ``None`` included (``milestones_epochs=None``: milestones as written).
    ``model`` itself is not modified. ``report`` tells the progress of the steps and of the test pass.
    """
    start = time.perf_counter()
    opts = eval_section(cfg, "semisup")
    unknown = set(overrides) - set(opts)
    if unknown:
        raise TypeError(f"unknown semisup settings {sorted(unknown)}; expected some of {sorted(opts)}")
    opts.update(overrides)
    if opts["augment"] not in ("crop", "none"):
        raise ValueError(f"eval.semisup.augment must be 'crop' or 'none', got {opts['augment']!r}")
    tag = fraction_tag(fraction)
    seed, epochs, bs = int(opts["seed"]), int(opts["epochs"]), int(opts["batch_size"])
    lr = float(opts["lr"])
    milestones = scaled_milestones(list(opts["milestones"]), opts["milestones_epochs"], epochs)
    gamma = float(opts["gamma"])
    crop_scale = tuple(float(v) for v in opts["crop_scale"])
    flip = bool(cfg.data.augment.flip)

    train_images, train_labels = train_split if train_split is not None else load_split(cfg.data, "train")
    test_images, test_labels = test_split if test_split is not None else load_split(cfg.data, eval_split(cfg.data))
    subset = load_or_create_subset(run_dir, train_labels, fraction, seed, opts["subset_files"], tag,
                                   train_images)
    images, labels = train_images[subset], train_labels[subset].to(device)
    n = len(images)

    with torch.random.fork_rng(devices=[]):  # classifier init from the seed, global RNG untouched
        torch.manual_seed(derive_seed(seed, 0xC1A55, subset.numel()))
        net = FineTuneNet(copy.deepcopy(model.backbone), int(model.feature_dim), num_classes(cfg.data))
    net.to(device)
    optimizer = finetune_optimizer(net, lr, float(opts["classifier_lr_mult"]), float(opts["momentum"]),
                                   float(opts["weight_decay"]))
    mean, std = normalization(cfg.data)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x0DE7, subset.numel()))
    # A trailing batch of one is dropped: BatchNorm cannot train on it.
    steps = max(1, n // bs + (1 if n % bs > 1 else 0))
    with report.track(f"semisup {tag}", epochs * steps, unit="step", epoch_steps=steps) as progress:
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(n, generator=gen)
            loss_sum = torch.zeros((), device=device)  # summed on the device: read only when a line shows it
            for b in range(steps):
                factor = lr_factor(epoch + b / steps, milestones, gamma)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                idx = order[b * bs : (b + 1) * bs]
                if opts["augment"] == "crop":
                    ids = idx.tolist()
                    x = crop_batch(images, ids, [derive_seed(seed, 0xF17E, epoch, i) for i in ids], crop_scale, flip)
                else:
                    x = materialize(images[idx])
                loss = nn.functional.cross_entropy(net(_normalise(x.to(device), mean_t, std_t)), labels[idx.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                progress.advance(1, lambda s=loss_sum, k=b + 1: f"loss {s.item() / k:.4f}")
    eval_bs = int(cfg.eval.batch_size)
    with report.track(f"semisup {tag} test", len(test_images), unit="img") as progress:
        logits = _logits(net, test_images, mean_t, std_t, device, eval_bs, progress)
    top1, top5 = topk_accuracy(logits, test_labels)
    return {f"semisup_{tag}_top1": top1, f"semisup_{tag}_top5": top5, f"semisup_{tag}_labels": int(n),
            f"semisup_{tag}_s": time.perf_counter() - start}


def semisup_eval(cfg: Any, model: nn.Module, device: torch.device, run_dir: Path, *,
                 fractions: list[float] | None = None,
                 train_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                 test_split: tuple[torch.Tensor, torch.Tensor] | None = None, report: Reporter = SILENT,
                 **overrides: Any) -> dict[str, float]:
    """:func:`finetune_subset` for every fraction (default ``cfg.eval.semisup.fractions``: 1% and 10%)."""
    start = time.perf_counter()
    if fractions is None:
        fractions = list(cfg.eval.semisup.fractions)
    train_split = train_split if train_split is not None else load_split(cfg.data, "train")
    test_split = test_split if test_split is not None else load_split(cfg.data, eval_split(cfg.data))
    results: dict[str, float] = {}
    for fraction in fractions:
        results.update(finetune_subset(cfg, model, device, run_dir, float(fraction), train_split=train_split,
                                       test_split=test_split, report=report, **overrides))
    results["semisup_eval_s"] = time.perf_counter() - start
    return results
