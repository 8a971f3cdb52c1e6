"""The linear probe over an evaluation world: BatchNorm1d (global batch) + Linear heads on the frozen backbone's
pooled features, trained data-parallel over the seeded global order with committed evaluation checkpoints
(invprop/eval/world.py), so a stopped probe resumes where it stopped.

Two modes (eval.linear.mode):
- ``features`` (small data sets): each rank features its part of the train split once (test transform plus
  `eval.linear.aug_views` seeded cropped views), the parts are gathered and the heads train on those tensors;
- ``online`` (the authors' ImageNet protocol): every step crops its images afresh (RandomResizedCrop at the
  evaluation size, scale eval.linear.crop_scale, horizontal flip; seeded by (seed, epoch, image)) and runs
  them through the frozen backbone in eval mode, so each epoch sees new views; under data.format=ffcv the crops
  are FFCV's (invprop/eval/crops.py), else PIL's.
One head per learning rate of eval.linear.lrs trains side by side on the same features (one backbone pass
feeds them all); the best is chosen on a seeded, class-balanced held-out part of the TRAINING split
(eval.linear.val_fraction), and only then is the test split read and scored, in shards (counts summed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich import get_console
from torch import nn

from invprop.collectives import Comm
from invprop.config.schema import Config
from invprop.data import eval_split, is_lazy, num_classes
from invprop.data.order import EpochOrder, shard_bounds
from invprop.data.seeding import derive_seed
from invprop.digest import state_digest
from invprop.eval.crops import FFCVCrops
from invprop.eval.linear import crop_batch, pooled_features
from invprop.eval.readers import EvalReader
from invprop.eval.world import (
    EvalCheckpoints,
    GlobalBatchNorm1d,
    eval_checkpoints,
    gather_shards,
    run_epochs,
    sum_gradients,
)
from invprop.progress import SILENT, Reporter
from invprop.schedules import cosine_factor, milestone_factor
from invprop.state import RunIdentity

SETTINGS = ("mode", "epochs", "lrs", "val_fraction", "schedule", "milestones", "gamma", "batch_size",
            "weight_decay", "momentum", "aug_views", "crop_scale", "seed")


class WorldLinearClassifier(nn.Module):
    """BatchNorm1d (no affine, statistics over the global batch) followed by a Linear layer."""

    def __init__(self, in_dim: int, n_classes: int, comm: Comm) -> None:
        super().__init__()
        self.bn = GlobalBatchNorm1d(in_dim, comm)
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class HeadGrid(nn.Module):
    """One head per learning rate, all from the same seeded initialisation, fed the same features."""

    def __init__(self, in_dim: int, n_classes: int, comm: Comm, count: int, seed: int) -> None:
        super().__init__()
        heads = []
        for _ in range(count):
            with torch.random.fork_rng(devices=[]):  # the init must not touch (or depend on) the global RNG
                torch.manual_seed(derive_seed(seed, 0x1EAD))
                heads.append(WorldLinearClassifier(in_dim, n_classes, comm))
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(H, B, C) logits."""
        return torch.stack([head(x) for head in self.heads])


def split_features(cfg: Config, model: nn.Module, images, comm: Comm, views: int = 0,
                   report: Reporter = SILENT, label: str = "linear features",
                   reader: EvalReader | None = None) -> torch.Tensor:
    """(1 + views, N, D) pooled features of the whole train split on every rank, each rank featuring its shard
    once (the test-transform pass through `reader`, default :meth:`EvalReader.for_config`); `report` tells this
    rank's images done."""
    n = len(images)
    lo, hi = shard_bounds(n, comm.rank, comm.world)
    part = images[lo:hi]
    lin, bs = cfg.eval.linear, cfg.eval.batch_size
    reader = reader or EvalReader.for_config(cfg.data, comm, is_lazy(images))
    plain = reader.rows(images, "train", lo, hi)
    with report.track(label, (hi - lo) * (1 + views), unit="img") as progress:
        own = [pooled_features(model, plain, cfg.data, comm.device, bs, progress=progress)]
        for view in range(views):
            own.append(pooled_features(model, part, cfg.data, comm.device, bs, view=view, seed=lin.seed,
                                       crop_scale=tuple(cfg.data.augment.crop_scale), flip=cfg.data.augment.flip,
                                       offset=lo, progress=progress))
    return torch.stack([gather_shards(f, n, comm) for f in own])


def lr_schedule(lin, epochs_done: float, step: int, total: int) -> float:
    """The factor on each head's lr: cosine to 0 over all steps, or x gamma at each milestone epoch."""
    if lin.schedule == "step":
        return milestone_factor(epochs_done, [float(m) for m in lin.milestones], lin.gamma)
    return cosine_factor(step, total)


# batch features for a rank's indices into the train split, at (epoch, global batch, indices)
BatchFeatures = Callable[[int, int, torch.Tensor], torch.Tensor]


def probe_order(lin, n_rows: int) -> EpochOrder:
    """The probe's seeded global order over its n_rows training rows (what run_epochs steps through)."""
    return EpochOrder(n_rows, min(lin.batch_size, n_rows), lin.seed)


def fit_heads(batch_features: BatchFeatures, dim: int, n: int, train_labels: torch.Tensor, n_classes: int,
              cfg: Config, comm: Comm, lrs: list[float], saver: EvalCheckpoints | None = None,
              report: Reporter = SILENT, rows: torch.Tensor | None = None) -> HeadGrid | None:
    """Train one head per lr in `lrs` on the features `batch_features(epoch, train indices)` gives, over `rows`
    of the train split (default: all n); SGD with momentum and eval.linear.schedule. The global batch is
    eval.linear.batch_size (divided among the ranks; the last partial batch of an epoch is dropped). None when
    stopped at a step boundary (a committed checkpoint is saved). `report` tells the steps with the loss."""
    lin = cfg.eval.linear
    rows = torch.arange(n) if rows is None else rows
    order = probe_order(lin, len(rows))
    local = order.local_batch_size(comm.world)
    device = comm.device
    grid = HeadGrid(dim, n_classes, comm, len(lrs), lin.seed).to(device).train()
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": lr, "base_lr": lr}
                                 for head, lr in zip(grid.heads, lrs, strict=True)],
                                lr=lrs[0], momentum=lin.momentum, weight_decay=lin.weight_decay)
    labels = train_labels.to(device)
    total = max(1, lin.epochs * order.num_batches)

    def step(epoch: int, b: int, positions: torch.Tensor, done: int) -> torch.Tensor:
        idx = rows[positions]
        x = batch_features(epoch, b, idx)
        factor = lr_schedule(lin, epoch + b / order.num_batches, done, total)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        target = labels[idx.to(device)]
        # each head's loss is this rank's part of the global batch's mean: the ranks' gradients sum to the
        # global one; the heads share nothing, so one backward over their sum trains each on its own loss
        losses = torch.stack([nn.functional.cross_entropy(logits, target, reduction="sum")
                              for logits in grid(x)]) / (local * comm.world)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        sum_gradients(list(grid.parameters()), comm)
        optimizer.step()
        return losses.detach().min() * comm.world  # this rank's mean loss of the best head, for the line

    # the settings come first: a checkpoint of a probe with other settings is refused before anything loads
    settings = RunIdentity({key: _plain(getattr(lin, key)) for key in SETTINGS})
    finished = run_epochs(order, lin.epochs, comm, step, saver,
                          {"settings": settings, "head": grid, "optimizer": optimizer}, report, "linear probe")
    return grid.eval() if finished else None


def _plain(value: object) -> object:
    """A setting as plain data, what a checkpoint stores (a list from the config becomes a list)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return list(value)


def fit_head_world(train_feats: torch.Tensor, train_labels: torch.Tensor, n_classes: int, cfg: Config,
                   comm: Comm, saver: EvalCheckpoints | None = None,
                   report: Reporter = SILENT) -> WorldLinearClassifier | None:
    """The features-mode head at the first of eval.linear.lrs on (V, N, D) features (each epoch one seeded view
    per sample), trained on every row."""
    grid = fit_heads(feature_batches(train_feats, cfg), train_feats.shape[2], train_feats.shape[1], train_labels,
                     n_classes, cfg, comm, [cfg.eval.linear.lrs[0]], saver, report)
    return None if grid is None else grid.heads[0]


def feature_batches(train_feats: torch.Tensor, cfg: Config) -> BatchFeatures:
    """Features mode: each epoch one seeded view of each sample, looked up in the (V, N, D) tensor."""
    lin = cfg.eval.linear
    n_views, n, _ = train_feats.shape
    views: dict[int, torch.Tensor] = {}

    def lookup(epoch: int, b: int, idx: torch.Tensor) -> torch.Tensor:
        if epoch not in views:  # seeded by the epoch, so a resumed epoch draws the same views
            gen = torch.Generator().manual_seed(derive_seed(lin.seed, 0xF1E, epoch))
            views.clear()
            views[epoch] = torch.randint(n_views, (n,), generator=gen).to(train_feats.device)
        idx = idx.to(train_feats.device)
        return train_feats[views[epoch][idx], idx]

    return lookup


def online_batches(cfg: Config, model: nn.Module, images, comm: Comm,
                   ffcv: FFCVCrops | None = None) -> BatchFeatures:
    """Online mode: each step crops its images afresh (seeded by (seed, epoch, image)) and features them
    through the frozen backbone in eval mode; the crops come from `ffcv` when given (the rank's rows of each
    global batch from the .beton, :mod:`invprop.eval.crops`), else from PIL or memory (:func:`crop_batch`)."""
    lin = cfg.eval.linear

    def crop_and_feature(epoch: int, b: int, idx: torch.Tensor) -> torch.Tensor:
        if ffcv is not None:
            crops = ffcv(epoch, b, idx)
        else:
            ids = idx.tolist()
            crops = crop_batch(images, ids, [derive_seed(lin.seed, 0x0C40, epoch, i) for i in ids],
                               tuple(lin.crop_scale), True)
        return pooled_features(model, crops, cfg.data, comm.device, len(idx))

    return crop_and_feature


def held_out_rows(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows), both sorted: round(fraction x n_c) rows of each class c held out, chosen
    by a generator seeded from (seed, class), so the split depends only on the seed and the labels."""
    labels = labels.cpu().to(torch.int64)
    held = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(derive_seed(seed, 0x7A11D, c))
        held.append(members[torch.randperm(members.numel(), generator=gen)[: round(fraction * members.numel())]])
    out = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.int64)
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[out] = False
    return keep.nonzero().squeeze(1), out


def score_heads(grid: HeadGrid, cfg: Config, model: nn.Module, images, labels: torch.Tensor, comm: Comm,
                report: Reporter = SILENT, label: str = "linear features test",
                rows: Callable[[int, int], object] | None = None) -> torch.Tensor:
    """(H, 2) top-1 / top-5 fractions of each head on a split, each rank featuring and scoring its shard;
    `rows(lo, hi)` gives the shard's images to feature (default: ``images[lo:hi]``)."""
    lo, hi = shard_bounds(len(labels), comm.rank, comm.world)
    part = images[lo:hi] if rows is None else rows(lo, hi)
    with report.track(label, hi - lo, unit="img") as progress:
        feats = pooled_features(model, part, cfg.data, comm.device, cfg.eval.batch_size, progress=progress)
    return count_hits(grid, feats, labels[lo:hi], comm) / len(labels)


@torch.no_grad()
def count_hits(grid: HeadGrid, feats: torch.Tensor, labels: torch.Tensor, comm: Comm,
               chunk: int = 4096) -> torch.Tensor:
    """(H, 2) top-1 / top-5 hits of each head on this rank's rows, summed over the ranks."""
    grid.eval()
    labels = labels.to(feats.device).view(1, -1, 1)
    hits = torch.zeros(len(grid.heads), 2, dtype=torch.float64, device=feats.device)
    for lo in range(0, feats.shape[0], chunk):
        logits = grid(feats[lo : lo + chunk])
        top = logits.topk(min(5, logits.shape[2]), dim=2).indices == labels[:, lo : lo + chunk]
        hits[:, 0] += top[:, :, 0].sum(1)
        hits[:, 1] += top.any(2).sum(1)
    if comm.world > 1:
        comm.all_reduce_(hits)
    return hits


def linear_eval(cfg: Config, model: nn.Module, comm: Comm, train_split: tuple,
                test_split: tuple | Callable[[], tuple], root: Path | None = None,
                report: Reporter = SILENT, reader: EvalReader | None = None) -> dict:
    """linear_top1 / linear_top5 (0..1) on the test split of the head whose lr (linear_lr) scored best on the
    held-out training rows (linear_val_top1, and linear_val_top1_by_lr for each lr); the same on every rank.
    `test_split` may be a loader, called only once the head is chosen. With `root`, committed evaluation
    checkpoints go there and a stopped probe returns {"preempted_at_step": n}. `report` tells the feature
    passes, the probe's steps and the choice. `reader` says how the test-transform passes read pixels (default:
    :meth:`EvalReader.for_config`: FFCV for image folders under data.format=ffcv)."""
    start = time.perf_counter()
    lin = cfg.eval.linear
    lrs = [float(lr) for lr in lin.lrs]
    train_images, train_labels = train_split
    reader = reader or EvalReader.for_config(cfg.data, comm, is_lazy(train_images))
    rows, held = held_out_rows(train_labels, lin.val_fraction, lin.seed)
    ffcv = None
    if lin.mode == "online":
        dim = model.feature_dim
        ffcv = reader.crops(train_images, "train", probe_order(lin, len(rows)), rows, derive_seed(lin.seed, 0x0C40),
                            tuple(lin.crop_scale), True)
        batches = online_batches(cfg, model, train_images, comm, ffcv)
    else:
        train_feats = split_features(cfg, model, train_images, comm, lin.aug_views, report, "linear features train",
                                     reader)
        dim, batches = train_feats.shape[2], feature_batches(train_feats, cfg)
    features_s = time.perf_counter() - start
    try:
        with eval_checkpoints(root, comm, cfg.eval.checkpoint_every_steps, cfg.eval.stop_at_step) as saver:
            grid = fit_heads(batches, dim, len(train_labels), train_labels, num_classes(cfg.data), cfg, comm,
                             lrs, saver, report, rows)
            if grid is None:
                return saver.preempted()
    finally:
        if ffcv is not None:
            ffcv.close()
    results: dict = {"linear_features_s": features_s}
    best = 0
    if len(held):
        if lin.mode == "online":
            val = score_heads(grid, cfg, model, train_images[held], train_labels[held], comm, report,
                              "linear features held-out")
        else:
            lo, hi = shard_bounds(len(held), comm.rank, comm.world)
            val = count_hits(grid, train_feats[0, held[lo:hi].to(train_feats.device)], train_labels[held[lo:hi]],
                             comm) / len(held)
        best = int(val[:, 0].argmax())  # the first of equals: lrs are tried in the order given
        results.update(linear_val_top1=val[best, 0].item(), linear_val_images=len(held),
                       linear_val_top1_by_lr={f"{lr:g}": v for lr, v in zip(lrs, val[:, 0].tolist(), strict=True)})
    results["linear_lr"] = lrs[best]
    _tell(report, f"linear lr {lrs[best]:g} chosen" + (f" on {len(held)} held-out training images (top-1 "
                                                        f"{results['linear_val_top1']:.4f})" if len(held) else ""))
    # the test split is read only now that the head is chosen
    test_images, test_labels = test_split() if callable(test_split) else test_split
    grid.heads = nn.ModuleList([grid.heads[best]])
    top1, top5 = score_heads(grid, cfg, model, test_images, test_labels, comm, report,
                             rows=lambda lo, hi: reader.rows(test_images, eval_split(cfg.data), lo, hi))[0].tolist()
    results.update(linear_top1=top1, linear_top5=top5,
                   linear_head_digest=state_digest(grid.heads[0].state_dict(), torch.empty(0), None),
                   linear_eval_s=time.perf_counter() - start)
    return results


def _tell(report: Reporter, text: str) -> None:
    """One line from the main rank (plain, whatever the console)."""
    if report.enabled:
        (report.console or get_console()).print(text, soft_wrap=True, markup=False, highlight=False)
