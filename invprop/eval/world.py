"""What the trained evaluations (linear probe, semisup) share over an evaluation world of W ranks.

Data-parallel steps over a seeded global order (invprop/data/order.py: global batch b of epoch e is the same
for any W that divides it, each rank takes its slice), gradients summed over the ranks, BatchNorm statistics
over the global batch, and a committed evaluation checkpoint (same protocol as pretraining's,
invprop/checkpoint.py) at step boundaries: every `eval.checkpoint_every_steps` and on USR2/SIGTERM
(StepBoundary), so a stopped evaluation resumes at the step it stopped at.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn

from invprop import checkpoint
from invprop.collectives import Comm
from invprop.data.order import DataPosition, EpochOrder, shard_bounds
from invprop.progress import SILENT, Reporter
from invprop.state import Stateful
from invprop.train.boundary import StepBoundary


def gather_shards(x: torch.Tensor, n: int, comm: Comm) -> torch.Tensor:
    """The rows of every rank's `shard_bounds(n, r, W)` shard, in order, on every rank (shards may differ in
    size: each is padded to the largest for the gather)."""
    if comm.world == 1:
        return x
    bounds = [shard_bounds(n, r, comm.world) for r in range(comm.world)]
    most = max(hi - lo for lo, hi in bounds)
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, most - x.shape[0]))
    rows = comm.gather_rows(padded.contiguous()).view(comm.world, most, *x.shape[1:])
    return torch.cat([rows[r, : hi - lo] for r, (lo, hi) in enumerate(bounds)])


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of every rank of `comm` (one differentiable
    all_reduce of the sums), computed the same way for one rank, so W ranks give what one rank gives."""

    def __init__(self, num_features: int, comm: Comm, affine: bool = False) -> None:
        super().__init__(num_features, affine=affine)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])
        total = dist_fn.all_reduce(local, group=self.comm.group) if self.comm.world > 1 else local
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1.0), self.momentum)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def sum_gradients(params: list[nn.Parameter], comm: Comm) -> None:
    """Every rank's gradient summed into each parameter (the loss is each rank's part of the global mean)."""
    if comm.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class EvalCheckpoints:
    """A trained evaluation's committed checkpoints under `root` (<run>/eval/<protocol>/from_<ckpt>/) and the
    step boundary that decides when to save and when to stop (identical on every rank)."""

    def __init__(self, root: Path, comm: Comm, every_steps: int, stop_at_step: int | None = None,
                 keep: int = 2) -> None:
        self.root, self.comm, self.keep = Path(root), comm, keep
        self.boundary = StepBoundary(comm, every_steps, 0.0, also=(signal.SIGTERM,), stop_at_step=stop_at_step)
        self.stopped_at: int | None = None

    def resume(self, states: Mapping[str, Stateful]) -> bool:
        """Load the newest committed checkpoint into `states`; False when there is none."""
        latest = checkpoint.latest(self.root, report=self.comm.is_main, states=states, comm=self.comm)
        if latest is None:
            return False
        checkpoint.load(latest, states)
        return True

    def after_step(self, step: int, states: Mapping[str, Stateful]) -> bool:
        """At a step boundary: save when due; True when the evaluation must stop here (saved)."""
        stop, save = self.boundary.poll(step)
        if save:
            checkpoint.save(self.root, step, states, comm=self.comm, keep=self.keep)
            self.boundary.saved()
        if stop:
            self.stopped_at = step
        return stop

    def preempted(self) -> dict[str, Any]:
        """What a stopped evaluation returns; the main rank first hands over to SLURM (submitit's checkpoint() +
        requeue) when it runs under it."""
        if self.comm.is_main:
            self.boundary.hand_over()
        return {"preempted_at_step": self.stopped_at}

    def close(self) -> None:
        self.boundary.close()


@contextlib.contextmanager
def eval_checkpoints(root: Path | None, comm: Comm, every_steps: int,
                     stop_at_step: int | None) -> Iterator[EvalCheckpoints | None]:
    """The :class:`EvalCheckpoints` under ``root`` for the length of a ``with`` (None where ``root`` is None:
    nothing is saved), closed however the block ends."""
    saver = None if root is None else EvalCheckpoints(root, comm, every_steps, stop_at_step)
    try:
        yield saver
    finally:
        if saver is not None:
            saver.close()


class Steps:
    """Step counter saved with the evaluation (the learning-rate schedule is a function of it)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def run_epochs(order: EpochOrder, epochs: int, comm: Comm,
               step_fn: Callable[[int, int, torch.Tensor, int], torch.Tensor | None],
               saver: EvalCheckpoints | None, states: dict[str, Stateful], report: Reporter = SILENT,
               label: str = "steps") -> bool:
    """Call step_fn(epoch, batch, this rank's indices, global step) for every global batch from the saved
    position on; True when all epochs ran, False when stopped at a boundary (a committed checkpoint saved).
    `states` gets "position" and "steps" added (what a resume needs besides the caller's parts). A step may
    return its (detached) loss: `report` tells the steps with the epoch's mean loss so far."""
    position, steps = DataPosition(order.num_batches), Steps()
    states = {**states, "position": position, "steps": steps}
    if saver is not None:
        saver.resume(states)
    with report.track(label, epochs * order.num_batches, done=steps.step, unit="step",
                      epoch_steps=order.num_batches) as progress:
        for epoch in range(position.epoch, epochs):
            loss_sum, counted = None, 0  # summed on the device: read only when a line shows it
            for b in range(position.batch if epoch == position.epoch else 0, order.num_batches):
                loss = step_fn(epoch, b, order.local_indices(epoch, b, comm.rank, comm.world), steps.step)
                steps.step += 1
                position.epoch, position.batch = (epoch + 1, 0) if b + 1 == order.num_batches else (epoch, b + 1)
                if loss is not None:
                    loss_sum, counted = (loss if loss_sum is None else loss_sum + loss), counted + 1
                progress.advance(1, None if loss_sum is None else
                                 (lambda s=loss_sum, k=counted: f"loss {s.item() / k:.4f}"))
                if saver is not None and saver.after_step(steps.step, states):
                    return False
    return True
