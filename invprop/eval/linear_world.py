"""The linear probe over an evaluation world: each rank features its part of the train split (test transform
and `eval.linear.aug_views` cropped views) and of the test split once, the parts are gathered, and the head
(global-batch BatchNorm1d + Linear) is trained data-parallel over the seeded global order, with committed
evaluation checkpoints (invprop/eval/world.py) so a stopped probe resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from invprop.collectives import Comm
from invprop.config.schema import Config
from invprop.data import num_classes
from invprop.data.order import EpochOrder, shard_bounds
from invprop.data.seeding import derive_seed
from invprop.digest import state_digest
from invprop.eval.linear import pooled_features, predict, topk_accuracy
from invprop.eval.world import EvalCheckpoints, GlobalBatchNorm1d, gather_shards, run_epochs, sum_gradients
from invprop.progress import SILENT, Reporter
from invprop.state import RunIdentity


class WorldLinearClassifier(nn.Module):
    """BatchNorm1d (no affine, statistics over the global batch) followed by a Linear layer."""

    def __init__(self, in_dim: int, n_classes: int, comm: Comm) -> None:
        super().__init__()
        self.bn = GlobalBatchNorm1d(in_dim, comm)
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def split_features(cfg: Config, model: nn.Module, images, comm: Comm, views: int = 0,
                   report: Reporter = SILENT, label: str = "linear features") -> torch.Tensor:
    """(1 + views, N, D) pooled features of the whole split on every rank, each rank featuring its shard once;
    `report` tells this rank's images done."""
    n = len(images)
    lo, hi = shard_bounds(n, comm.rank, comm.world)
    part = images[lo:hi]
    lin, bs = cfg.eval.linear, cfg.eval.batch_size
    with report.track(label, (hi - lo) * (1 + views), unit="img") as progress:
        own = [pooled_features(model, part, cfg.data, comm.device, bs, progress=progress)]
        for view in range(views):
            own.append(pooled_features(model, part, cfg.data, comm.device, bs, view=view, seed=lin.seed,
                                       crop_scale=tuple(cfg.data.augment.crop_scale), flip=cfg.data.augment.flip,
                                       offset=lo, progress=progress))
    return torch.stack([gather_shards(f, n, comm) for f in own])


def fit_head_world(train_feats: torch.Tensor, train_labels: torch.Tensor, n_classes: int, cfg: Config,
                   comm: Comm, saver: EvalCheckpoints | None = None,
                   report: Reporter = SILENT) -> WorldLinearClassifier | None:
    """Train the head on (V, N, D) features (each epoch one seeded view per sample); SGD with momentum, cosine
    lr to 0. The global batch is eval.linear.batch_size (divided among the ranks; the last partial batch of an
    epoch is dropped). None when stopped at a step boundary (a committed checkpoint is saved). `report` tells
    the steps with the loss."""
    lin = cfg.eval.linear
    n_views, n, dim = train_feats.shape
    order = EpochOrder(n, min(lin.batch_size, n), lin.seed)
    local = order.local_batch_size(comm.world)
    with torch.random.fork_rng(devices=[]):  # the head's init must not touch (or depend on) the global RNG
        torch.manual_seed(derive_seed(lin.seed, 0x1EAD))
        head = WorldLinearClassifier(dim, n_classes, comm)
    head.to(train_feats.device).train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lin.lr, momentum=lin.momentum, weight_decay=lin.weight_decay)
    labels = train_labels.to(train_feats.device)
    total = max(1, lin.epochs * order.num_batches)

    views: dict[int, torch.Tensor] = {}

    def epoch_views(epoch: int) -> torch.Tensor:
        """The view of each sample in `epoch`: seeded by the epoch, so a resumed epoch draws the same ones."""
        if epoch not in views:
            gen = torch.Generator().manual_seed(derive_seed(lin.seed, 0xF1E, epoch))
            views.clear()
            views[epoch] = torch.randint(n_views, (n,), generator=gen).to(train_feats.device)
        return views[epoch]

    def step(epoch: int, b: int, idx: torch.Tensor, done: int) -> torch.Tensor:
        idx = idx.to(train_feats.device)
        x = train_feats[epoch_views(epoch)[idx], idx]
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lin.lr * (1 + math.cos(math.pi * done / total))
        # this rank's part of the global batch's mean loss: the ranks' gradients sum to the global one
        loss = nn.functional.cross_entropy(head(x), labels[idx], reduction="sum") / (local * comm.world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(list(head.parameters()), comm)
        optimizer.step()
        return loss.detach() * comm.world  # this rank's mean loss, for the progress line

    # the settings come first: a checkpoint of a probe with other settings is refused before anything loads
    settings = RunIdentity({key: getattr(lin, key) for key in ("epochs", "lr", "batch_size", "weight_decay",
                                                               "momentum", "aug_views", "seed")})
    finished = run_epochs(order, lin.epochs, comm, step, saver,
                          {"settings": settings, "head": head, "optimizer": optimizer}, report, "linear probe")
    return head.eval() if finished else None


def linear_eval(cfg: Config, model: nn.Module, comm: Comm, train_split: tuple, test_split: tuple,
                root: Path | None = None, report: Reporter = SILENT) -> dict[str, float]:
    """linear_top1 / linear_top5 (0..1) on the test split; the same on every rank. With `root`, committed
    evaluation checkpoints go there and a stopped probe returns {"preempted_at_step": n}. `report` tells the
    feature passes and the probe's steps."""
    start = time.perf_counter()
    (train_images, train_labels), (test_images, test_labels) = train_split, test_split
    train_feats = split_features(cfg, model, train_images, comm, cfg.eval.linear.aug_views, report,
                                 "linear features train")
    test_feats = split_features(cfg, model, test_images, comm, report=report, label="linear features test")[0]
    features_s = time.perf_counter() - start
    saver = None if root is None else EvalCheckpoints(root, comm, cfg.eval.checkpoint_every_steps,
                                                      cfg.eval.stop_at_step)
    try:
        head = fit_head_world(train_feats, train_labels, num_classes(cfg.data), cfg, comm, saver, report)
        if head is None:
            if comm.is_main:
                saver.boundary.hand_over()  # under SLURM: submitit's checkpoint() + requeue
            return {"preempted_at_step": saver.stopped_at}
    finally:
        if saver is not None:
            saver.close()
    top1, top5 = topk_accuracy(predict(head, test_feats), test_labels)
    return {"linear_top1": top1, "linear_top5": top5, "linear_head_digest": state_digest(head.state_dict(),
                                                                                          torch.empty(0), None),
            "linear_features_s": features_s,
            "linear_eval_s": time.perf_counter() - start}
