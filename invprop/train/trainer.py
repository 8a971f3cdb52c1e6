"""The pretraining loop: one method per job (build, step, epoch, log, save), in the ffcv-imagenet style."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from invprop import checkpoint
from invprop.bank import ShardedBank
from invprop.collectives import Comm
from invprop.config import Config
from invprop.config.identity import run_identity
from invprop.data import EpochOrder, eval_batches, load_split, normalization
from invprop.data.augment import BatchColorAugment, eval_transform
from invprop.data.loader import batch_generator
from invprop.data.order import DataPosition
from invprop.data.sources import BatchSource, build_batch_source
from invprop.digest import state_digest
from invprop.graph import UNKNOWN, NeighbourGraph
from invprop.logger import build_logger, config_markdown, views_grid
from invprop.loss import StepOutput, monitor_floats
from invprop.method import method_of
from invprop.metrics import MetricsLog
from invprop.models import build_model
from invprop.models.sync_bn import convert_sync_batchnorm
from invprop.schedules import warmup_cosine_lr
from invprop.state import RunIdentity, Stateful, TorchRng
from invprop.train.boundary import StepBoundary
from invprop.train.estimate import steps_estimate
from invprop.train.progress import TrainProgress


def bank_selection(cfg: Config, device: torch.device) -> str:
    """`bank.selection`, except that a deterministic run on an accelerator does not pick by timing: the
    strategies agree exactly on the selected set but not in the last bit of every score."""
    selection = cfg.bank.selection
    if selection == "auto" and cfg.deterministic and device.type != "cpu":
        return "topk"
    return selection


def window_means(window: list[dict[str, torch.Tensor | float]]) -> dict[str, float]:
    """Mean of each monitor over a window of steps (keys of the last step); the device tensors are averaged
    on the device and read back in one copy."""
    keys = list(window[-1])
    on_device = [k for k in keys if isinstance(window[-1][k], torch.Tensor)]
    means = monitor_floats({k: torch.stack([w[k].float() for w in window if k in w]).mean() for k in on_device})
    for k in keys:
        if k not in means:
            means[k] = float(np.mean([float(w[k]) for w in window if k in w]))
    return {k: means[k] for k in keys}


class Diverged(RuntimeError):
    """The loss became NaN or inf: the run stops with what it has committed."""


@dataclass
class TrainState:
    """Optimiser steps done in total (the learning-rate schedule's position); a checkpoint part. Where the data
    stream stands is the trainer's `position` (a DataPosition), a part of its own."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is only reproducible with a fixed workspace; without it every GEMM on a GPU raises in this mode.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # MKL may shrink its thread team under load (MKL_DYNAMIC), changing summation order between runs.
        torch.set_num_threads(1)
    # Batches have one fixed size, so timing cuDNN's convolution algorithms once per shape pays off; the
    # timing may pick differently between runs, so not in a deterministic one.
    torch.backends.cudnn.benchmark = not deterministic


class Trainer:
    def __init__(self, cfg: Config, comm: Comm, run_dir: Path) -> None:
        self.cfg, self.comm, self.run_dir = cfg, comm, Path(run_dir)
        self.device = device = comm.device
        seed_everything(cfg.seed, cfg.deterministic)
        self.images, self.labels = load_split(cfg.data, "train")
        self._test_split: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n = int(self.labels.shape[0])
        self.label_table = self.labels.to(device)
        self.model = build_model(cfg.model).to(device)
        if cfg.model.sync_bn and comm.world > 1:
            self.model = convert_sync_batchnorm(self.model, device)
        self.channels_last = cfg.train.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.bf16 = cfg.train.precision == "bf16"
        self.net = self._wrap(self.model, cfg.train.compile)
        self.bank = ShardedBank(self.n, cfg.model.embedding_dim, comm=comm, seed=cfg.seed,
                                selection=bank_selection(cfg, device))
        self.method = method_of(cfg.method)
        self.graph = NeighbourGraph(self.n, cfg.method.k, device) if self.method.uses_graph else None
        self.criterion = self.method.criterion(cfg.method, self.bank, self.graph, self.n)
        self.order = EpochOrder(self.n, cfg.train.batch_size, cfg.seed)
        self.augment = BatchColorAugment.from_config(cfg.data.augment, *normalization(cfg.data)).to(device)
        self.source: BatchSource = build_batch_source(
            cfg.data, self.images, self.labels, self.order, seed=cfg.seed, workers=cfg.train.num_workers,
            rank=comm.rank, world=comm.world, device=device, is_main=comm.is_main)
        self.base_lr = cfg.train.lr * cfg.train.batch_size / 128
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.base_lr,
                                         momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay,
                                         fused=device.type == "cuda")  # one kernel for all parameters
        self.total_steps = cfg.train.epochs * self.order.num_batches
        self.state = TrainState()
        self.position = DataPosition(self.order.num_batches)
        self.rng = TorchRng()
        self.logger = build_logger(cfg, self.run_dir, enabled=comm.is_main)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=comm.is_main, mirror=self.logger)
        self.ckpt_root = self.run_dir / "checkpoints"
        self._selection_reported = False

    def batches(self) -> Any:
        """This rank's batches of the current epoch from the saved position."""
        return self.source.epoch(self.position.epoch, self.position.batch)

    def _wrap(self, model: torch.nn.Module, compile_model: bool) -> torch.nn.Module:
        """DDP across ranks, then optionally torch.compile (DDP-aware graph breaks at bucket boundaries)."""
        net = DistributedDataParallel(model) if self.comm.world > 1 else model
        return torch.compile(net) if compile_model else net

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Forward under bf16 autocast when asked; the bank and the loss's exp-sums always stay fp32."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z = self.net(x)
        return torch.nn.functional.normalize(z.float(), dim=1) if self.bf16 else z

    @torch.no_grad()
    def fill_bank_from_network(self) -> None:
        """`method.bank_init=network`: this rank's bank rows become the untrained network's embeddings of the
        un-augmented images (train-mode BatchNorm, as in a training step; running statistics restored after).

        Random rows (the paper's init; docs/DESIGN.md, "Departures from the paper") make the first epochs fit
        each image to a random vector, which on a short budget pulls the network below its untrained kNN; rows
        from the network give the instance term a target it can learn invariance around from the first step.
        """
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        self.model.train()
        local = max(1, self.cfg.train.batch_size // self.comm.world)
        mean, std = normalization(self.cfg.data)
        lo = self.bank.start
        for batch in eval_batches(self.images[self.bank.start : self.bank.stop], local):
            hi = lo + batch.shape[0]
            x = eval_transform(batch.to(self.device), mean, std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # The bare model, not DDP: ranks hold different row counts, and DDP's forward is a collective.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                z = self.model(x)
            self.bank.rows[lo - self.bank.start : hi - self.bank.start] = F.normalize(z.float(), dim=1)
            lo = hi
        for name, b in self.model.named_buffers():
            b.copy_(buffers[name])

    # -- schedule ---------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        warm = self.cfg.train.lr_warmup_epochs * self.order.num_batches
        return warmup_cosine_lr(step, self.base_lr, self.total_steps, warm)

    def set_lr(self) -> float:
        lr = self.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # -- one step ---------------------------------------------------------------------------------------
    def augment_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Colour augmentations as batched ops on the device; parameters drawn for the whole global batch
        from (seed, epoch, batch), so they do not depend on the world size."""
        gen = batch_generator(self.cfg.seed, self.position.epoch, self.position.batch, self.device)
        local = images.shape[0]
        x = images.to(self.device, non_blocking=True)
        return self.augment(x, gen, row_offset=self.comm.rank * local, rows_total=local * self.comm.world)

    def train_step(self, images: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One optimiser step. The monitors come back as device tensors, read only when a window is logged:
        on a GPU a per-step .item() would drain the queue and expose every kernel launch of the next step."""
        lr = self.set_lr()
        self.net.train()
        z = self.embed(self.augment_batch(images))
        # non_blocking: a blocking copy (or one from pageable memory) waits for the whole GPU queue
        out = self.criterion(z, indices.to(self.device, non_blocking=True), self.position.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        # out.loss sums to the global mean over ranks; DDP averages gradients, so scale back by W.
        (out.loss * self.comm.world).backward()
        self.optimizer.step()
        self.criterion.commit(out)
        return {**out.monitors, **self.purity(out), "lr": lr}

    def purity(self, out: StepOutput) -> dict[str, torch.Tensor]:
        """Monitoring only: share of chosen positives / new graph neighbours with the anchor's label."""
        if out.positives is None:
            return {}
        anchor = self.label_table[out.ids].unsqueeze(1)
        valid = out.positives != UNKNOWN
        same = (self.label_table[out.positives.clamp(min=0)] == anchor) & valid
        graph_same = self.label_table[out.neighbours] == anchor
        return {"hp_purity": same.sum() / valid.sum().clamp(min=1), "graph_purity": graph_same.float().mean()}

    # -- loops ------------------------------------------------------------------------------------------
    def fit(self, boundary: StepBoundary | None = None) -> bool:
        """Train to the configured epochs; returns False when the ranks agreed to stop for preemption.

        At every step boundary the ranks poll `boundary` together; a stop or a periodic save writes a
        committed checkpoint first, so a requeued job continues from exactly this step.
        """
        epochs = self.cfg.train.epochs
        if self.state.step == 0:
            self.evaluate_epoch()  # the curve starts at the untrained network (and the initial bank)
        estimated = False
        with TrainProgress(self.total_steps, self.state.step, enabled=self.comm.is_main,
                           epoch_steps=self.order.num_batches) as progress:
            while self.position.epoch < epochs:
                loader = self.batches()
                window, tick = [], time.perf_counter()
                steps_before = self.state.step
                for images, _labels, indices in loader:
                    if self.state.step == 0:
                        self.log_start(images)
                    window.append(self.train_step(images, indices))
                    self.report_bank_selection(progress)
                    self.position.batch += 1
                    self.state.step += 1
                    if self.position.batch == self.order.num_batches:  # the epoch is complete
                        self.position.epoch += 1
                        self.position.batch = 0
                    if self.state.step % self.cfg.train.log_every == 0 or self.position.batch == 0:
                        elapsed = time.perf_counter() - tick
                        record = self.log_window(window, len(window) * self.order.global_batch / max(elapsed, 1e-9))
                        progress.update(self.state.step, record)
                        if not estimated:  # once per launch: what the whole run will take at this pace
                            estimated = True
                            line = steps_estimate(len(window), elapsed, self.state.step, self.total_steps,
                                                  self.order.num_batches)
                            if line:
                                progress.note(line)
                        window, tick = [], time.perf_counter()
                    else:
                        progress.update(self.state.step, None)
                    if self.position.batch == 0:
                        self.evaluate_epoch()
                    if boundary is not None:
                        stop, save = boundary.poll(self.state.step)
                        if save:
                            self.save_checkpoint()
                            boundary.saved()
                        if stop:
                            return False
                    if self.position.batch == 0:
                        break  # the loader of a finished epoch has nothing left
                if self.state.step == steps_before:  # asking again would spin forever on the same empty epoch
                    raise RuntimeError(f"epoch {self.position.epoch} from batch {self.position.batch} yielded no batch "
                                       f"({self.order.num_batches} batches of {self.order.global_batch} per epoch); "
                                       "the checkpoint's data position does not fit this run: use a new out_dir")
        return True

    def log_start(self, images: torch.Tensor) -> None:
        """A fresh run's first batch: the resolved config and a grid of its augmented views, for the logger
        (the views are drawn from the same per-batch generator as the step's, so they are what it trains on)."""
        if not self.logger.active:
            return
        self.logger.text("config", config_markdown(OmegaConf.to_yaml(self.cfg)), 0)
        if self.logger.views > 0:
            with torch.no_grad():
                views = self.augment_batch(images)
            self.logger.image("augmented_views", views_grid(views, *normalization(self.cfg.data), self.logger.views), 0)

    def close(self) -> None:
        """Flush and close the logger's files."""
        self.logger.close()

    def report_bank_selection(self, progress: TrainProgress) -> None:
        """Once: what `bank.selection=auto` measured and chose on this accelerator (main rank)."""
        if self.bank.tuned is None or self._selection_reported:
            return
        self._selection_reported = True
        if self.comm.is_main:
            timings = ", ".join(f"{k} {v:.2f} ms" for k, v in self.bank.tuning_ms.items())
            progress.note(f"bank top-M selection: {self.bank.tuned} ({timings})")

    def log_window(self, window: list[dict[str, torch.Tensor | float]], img_s: float) -> dict[str, Any]:
        record: dict[str, Any] = window_means(window)
        record.update(step=self.state.step, epoch=self.position.epoch + self.position.batch / self.order.num_batches,
                      img_s=img_s, time=time.time())
        self.metrics.write(record)
        if not math.isfinite(float(record.get("loss", 0.0))):
            raise Diverged(self._divergence(record))
        return record

    def _divergence(self, record: dict[str, Any]) -> str:
        """One line for a loss that became NaN or inf: where, the terms, the settings in force, what is kept."""
        terms = ", ".join(f"{k} {record[k]:.4g}" for k in ("loss_ins", "loss_inv") if k in record)
        latest = checkpoint.latest(self.ckpt_root, report=False)
        kept = f"checkpoint step {checkpoint.step_of(latest)} is kept" if latest else "no checkpoint was written yet"
        return (f"training diverged: loss {record['loss']} at step {self.state.step} ({terms}) with lr "
                f"{record.get('lr', float('nan')):.4g} and method.tau={self.cfg.method.tau}; {kept}; lower train.lr "
                "or raise method.tau")

    def evaluate_epoch(self) -> None:
        """kNN accuracy over training (eval.every_epochs > 0) into metrics.jsonl, for the curves in reports."""
        every = self.cfg.eval.every_epochs
        if every <= 0 or self.position.epoch % every:
            return
        from invprop.eval.knn_eval import evaluate_knn_world  # the evaluation layer sits beside the loop

        # a quick estimate on the first test images, over training's ranks (each features its part)
        test = self.cfg.eval.every_epochs_test_images
        images, labels = self.test_split()
        found = evaluate_knn_world(self.cfg, self.model, self.bank, (self.images, self.labels),
                                   (images[:test], labels[:test]) if test else (images, labels))
        self.metrics.write({"step": self.state.step, "epoch": self.position.epoch, "time": time.time(),
                            **{f"epoch_{k}": v for k, v in found.items()}})

    def test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation split, read once: every curve point and the kNN baselines use it."""
        if self._test_split is None:
            from invprop.data import eval_split

            self._test_split = load_split(self.cfg.data, eval_split(self.cfg.data))
        return self._test_split

    # -- state ------------------------------------------------------------------------------------------
    def states(self) -> dict[str, Stateful]:
        """Every part of this run a resume needs, by name; each owns its state. The identity (the config's settings
        a resume cannot change) comes first so that a checkpoint this run cannot continue is refused before
        anything is loaded."""
        parts: dict[str, Stateful] = {"identity": RunIdentity(run_identity(self.cfg)), "model": self.model,
                                      "optimizer": self.optimizer, "bank": self.bank}
        if self.graph is not None:
            parts["graph"] = self.graph
        parts.update(train=self.state, data=self.position, rng=self.rng)
        return parts

    def restore(self, directory: Path) -> None:
        """Resume from a committed checkpoint (the bank resharded for this world size)."""
        checkpoint.load(directory, self.states())
        self.metrics.truncate_after(self.state.step)

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self.ckpt_root, self.state.step, self.states(), comm=self.comm,
                               keep=self.cfg.train.keep_checkpoints)

    def digest(self) -> str:
        """Collective: sha256 of weights, the whole bank (gathered in row order) and the graph."""
        bank = self.bank.gather_full()
        return state_digest(self.model.state_dict(), bank, None if self.graph is None else self.graph.table)
