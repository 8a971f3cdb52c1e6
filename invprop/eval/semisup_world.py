"""Semi-supervised fine-tuning over an evaluation world: the whole network (global-batch BatchNorm) trained
data-parallel on the label subset over the seeded global order, gradients summed over the ranks, with committed
evaluation checkpoints per fraction (invprop/eval/world.py); the test split is scored in shards, counts summed.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from invprop.collectives import Comm
from invprop.config.schema import Config
from invprop.data import eval_split, is_lazy, materialize, normalization, num_classes
from invprop.data.order import EpochOrder, shard_bounds
from invprop.data.seeding import derive_seed
from invprop.digest import state_digest
from invprop.eval.linear import crop_batch
from invprop.eval.readers import EvalReader
from invprop.eval.semisup import FineTuneNet, _logits, _normalise, finetune_optimizer
from invprop.eval.subsets import fraction_tag, load_or_create_subset
from invprop.eval.world import eval_checkpoints, run_epochs, sum_gradients
from invprop.models.sync_bn import convert_sync_batchnorm
from invprop.progress import SILENT, Reporter
from invprop.schedules import milestone_factor, scaled_milestones
from invprop.state import RunIdentity

SETTINGS = ("epochs", "milestones", "milestones_epochs", "gamma", "lr", "classifier_lr_mult", "batch_size",
            "weight_decay", "momentum", "augment", "crop_scale", "seed")


def finetune_world(cfg: Config, model: nn.Module, comm: Comm, run_dir: Path, fraction: float,
                   train_split: tuple, test_split: tuple, root: Path | None = None,
                   report: Reporter = SILENT, reader: EvalReader | None = None) -> dict:
    """``semisup_<pct>_top1`` / ``_top5`` (0..1), the same on every rank; {"preempted_at_step": n} when
    stopped at a step boundary (checkpoints under `root`). `report` tells the steps and this rank's test pass.
    `reader` (default :meth:`EvalReader.for_config`) says where the training crops and the test pass read
    pixels: FFCV's seeded crop and centre-crop loaders under data.format=ffcv, else PIL or memory."""
    start = time.perf_counter()
    opts, device = cfg.eval.semisup, comm.device
    tag = fraction_tag(fraction)
    (train_images, train_labels), (test_images, test_labels) = train_split, test_split
    if comm.is_main:  # rank 0 chooses and writes the subset list; the others read it
        load_or_create_subset(run_dir, train_labels, fraction, opts.seed, opts.subset_files, tag, train_images)
    comm.barrier()
    subset = load_or_create_subset(run_dir, train_labels, fraction, opts.seed, opts.subset_files, tag,
                                   train_images)
    images, labels = train_images[subset], train_labels[subset].to(device)
    n = len(images)
    order = EpochOrder(n, min(opts.batch_size, n), derive_seed(opts.seed, 0x0DE7, n))
    local = order.local_batch_size(comm.world)
    with torch.random.fork_rng(devices=[]):  # classifier init from the seed, global RNG untouched
        torch.manual_seed(derive_seed(opts.seed, 0xC1A55, subset.numel()))
        net = FineTuneNet(copy.deepcopy(model.backbone), model.feature_dim, num_classes(cfg.data))
    net = convert_sync_batchnorm(net, device, comm.group) if comm.world > 1 else net
    net.to(device)
    optimizer = finetune_optimizer(net, opts.lr, opts.classifier_lr_mult, opts.momentum, opts.weight_decay)
    milestones = scaled_milestones(list(opts.milestones), opts.milestones_epochs, opts.epochs)
    mean, std = normalization(cfg.data)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    reader = reader or EvalReader.for_config(cfg.data, comm, is_lazy(train_images))
    ffcv = None if opts.augment != "crop" else reader.crops(
        train_images, "train", order, subset, derive_seed(opts.seed, 0xF17E), tuple(opts.crop_scale),
        cfg.data.augment.flip)

    def step(epoch: int, b: int, idx: torch.Tensor, done: int) -> torch.Tensor:
        net.train()
        factor = milestone_factor(epoch + b / order.num_batches, milestones, opts.gamma)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        if ffcv is not None:  # the subset's rows of the .beton, cropped by FFCV
            x = ffcv(epoch, b, subset[idx])
        elif opts.augment == "crop":
            ids = idx.tolist()
            x = crop_batch(images, ids, [derive_seed(opts.seed, 0xF17E, epoch, i) for i in ids],
                           tuple(opts.crop_scale), cfg.data.augment.flip)
        else:
            x = materialize(images[idx])
        logits = net(_normalise(x.to(device), mean_t, std_t))
        loss = nn.functional.cross_entropy(logits, labels[idx.to(device)], reduction="sum") / (local * comm.world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(list(net.parameters()), comm)
        optimizer.step()
        return loss.detach() * comm.world  # this rank's mean loss, for the progress line

    settings = RunIdentity({"fraction": fraction, **{key: _plain(getattr(opts, key)) for key in SETTINGS}})
    try:
        with eval_checkpoints(None if root is None else root / tag, comm, cfg.eval.checkpoint_every_steps,
                              cfg.eval.stop_at_step) as saver:
            if not run_epochs(order, opts.epochs, comm, step, saver,
                              {"settings": settings, "net": net, "optimizer": optimizer}, report, f"semisup {tag}"):
                return saver.preempted()
    finally:
        if ffcv is not None:
            ffcv.close()
    lo, hi = shard_bounds(len(test_labels), comm.rank, comm.world)
    with report.track(f"semisup {tag} test", hi - lo, unit="img") as progress:
        logits = _logits(net, reader.rows(test_images, eval_split(cfg.data), lo, hi), mean_t, std_t, device,
                         cfg.eval.batch_size, progress)
    mine = test_labels[lo:hi].to(device)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    counts = torch.stack([(top[:, 0] == mine).sum(), (top == mine.view(-1, 1)).any(1).sum()]).double()
    if comm.world > 1:
        comm.all_reduce_(counts)
    total = len(test_labels)
    return {f"semisup_{tag}_top1": counts[0].item() / total, f"semisup_{tag}_top5": counts[1].item() / total,
            f"semisup_{tag}_labels": n, f"semisup_{tag}_digest": state_digest(net.state_dict(), torch.empty(0), None),
            f"semisup_{tag}_s": time.perf_counter() - start}


def _plain(value: object) -> object:
    """A setting as plain data, what a checkpoint stores (a list from the config becomes a list)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return list(value)


def semisup_world(cfg: Config, model: nn.Module, comm: Comm, run_dir: Path, train_split: tuple,
                  test_split: tuple, root: Path | None = None, report: Reporter = SILENT,
                  reader: EvalReader | None = None) -> dict:
    """:func:`finetune_world` for every fraction of eval.semisup.fractions; stops at the first one stopped."""
    start = time.perf_counter()
    results: dict = {}
    for fraction in cfg.eval.semisup.fractions:
        found = finetune_world(cfg, model, comm, run_dir, fraction, train_split, test_split, root, report,
                               reader)
        if "preempted_at_step" in found:
            return found
        results.update(found)
    results["semisup_eval_s"] = time.perf_counter() - start
    return results
