"""The step-boundary decision (stop / save) is the same on every rank, and per-step monitors stay on the device
until a window is logged."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from invprop import distributed
from invprop.collectives import Comm
from invprop.jobs.spawn import spawn_ranks
from invprop.train.boundary import StepBoundary
from invprop.train.trainer import window_means

pytestmark = pytest.mark.timeout(120)


def _boundary_worker(rank: int, world: int, out_dir: str) -> None:
    comm = distributed.init(distributed.read_env(), timeout_s=30)
    boundary = StepBoundary(comm, every_steps=3)
    try:
        assert comm.control is not None  # flags go through the host-side gloo group
        assert comm.backend == "gloo" and distributed.read_env().local_world_size == 2
        seen = [boundary.poll(1), boundary.poll(3)]
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is told to stop
        seen.append(boundary.poll(4))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(seen, fh)
    finally:
        boundary.close()
        distributed.shutdown()


def test_every_rank_sees_one_ranks_preemption(tmp_path) -> None:
    spawn_ranks(_boundary_worker, 2, (str(tmp_path),), timeout_s=90)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # step 1: nothing; step 3: periodic save; step 4: stop (and save) on both ranks although only rank 1
        # received the signal
        assert seen == [[False, False], [False, True], [True, True]], rank


def test_single_process_boundary_needs_no_collective() -> None:
    boundary = StepBoundary(Comm(), every_steps=2)
    try:
        assert boundary.poll(1) == (False, False) and boundary.poll(2) == (False, True)
        boundary.preempted = True
        assert boundary.poll(3) == (True, True)
    finally:
        boundary.close()


def test_stop_at_step_raises_the_real_signal_at_that_step() -> None:
    """train.stop_at_step: the stop comes from a real USR2 through the installed handler, at exactly that step."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: caught.append(signum))  # stands for submitit's
    boundary = StepBoundary(Comm(), stop_at_step=3)
    try:
        assert [boundary.poll(s) for s in (1, 2)] == [(False, False)] * 2 and not boundary.preempted
        assert boundary.poll(3) == (True, True) and boundary.preempted
        boundary.hand_over()  # what a stopped rank 0 does: the handler that was there before gets the signal
        assert caught == [signal.SIGUSR2]
    finally:
        boundary.close()
        signal.signal(signal.SIGUSR2, previous)
    resumed = StepBoundary(Comm(), stop_at_step=3)  # a run resumed from step 3 polls 4 onwards
    try:
        assert resumed.poll(4) == (False, False)
    finally:
        resumed.close()


def test_window_means_of_device_monitors_equal_plain_means() -> None:
    gen = torch.Generator().manual_seed(0)
    window = [{"loss": torch.rand((), generator=gen), "hp_purity": torch.rand((), generator=gen), "lr": 0.1 * i}
              for i in range(5)]
    window[0].pop("hp_purity")  # a key missing from some steps is averaged over the steps that have it
    got = window_means(window)
    assert list(got) == ["loss", "hp_purity", "lr"]
    assert got["loss"] == pytest.approx(np.mean([float(w["loss"]) for w in window]), rel=1e-6)
    assert got["hp_purity"] == pytest.approx(np.mean([float(w["hp_purity"]) for w in window[1:]]), rel=1e-6)
    assert got["lr"] == pytest.approx(0.2) and all(isinstance(v, float) for v in got.values())
