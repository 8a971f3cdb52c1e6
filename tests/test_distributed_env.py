"""Who the ranks are and which backend they talk through, from the environment torchrun / SLURM / spawn set."""

from __future__ import annotations

import pytest
import torch

from invprop.distributed import backend_for, read_env, tasks_on_this_node

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: nothing runs on it


@pytest.mark.parametrize(("device", "ranks_here", "gpus_here", "backend"), [
    (CPU, 4, 0, "gloo"),
    (GPU, 1, 1, "nccl"),
    (GPU, 8, 8, "nccl"),
    (GPU, 2, 1, "gloo"),  # two ranks on one GPU: NCCL would refuse the duplicate device
    (GPU, 8, 4, "gloo"),
])
def test_nccl_only_when_every_rank_has_its_own_gpu(device, ranks_here, gpus_here, backend) -> None:
    assert backend_for(device, ranks_here, gpus_here) == backend


@pytest.mark.parametrize(("tasks", "node", "here"), [
    ("2(x3),1", "0", 2), ("2(x3),1", "2", 2), ("2(x3),1", "3", 1), ("4", "0", 4), ("1,3", "1", 3),
])
def test_tasks_on_this_node_reads_slurms_compressed_list(tasks, node, here) -> None:
    assert tasks_on_this_node({"SLURM_TASKS_PER_NODE": tasks, "SLURM_NODEID": node}) == here


def test_the_steps_own_layout_wins_over_the_jobs() -> None:
    env = {"SLURM_TASKS_PER_NODE": "4", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0"}
    assert tasks_on_this_node(env) == 2


def test_local_world_size_from_each_launcher() -> None:
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert (read_env(torchrun).world_size, read_env(torchrun).local_world_size) == (4, 2)
    # without LOCAL_WORLD_SIZE every rank is taken to be on this machine
    assert read_env({"RANK": "0", "WORLD_SIZE": "3"}).local_world_size == 3
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "6", "SLURM_NODEID": "2",
             "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "127.0.0.1"}
    env = read_env(slurm)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 6, 2)
    assert read_env({}).local_world_size == 1
