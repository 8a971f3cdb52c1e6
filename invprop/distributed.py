"""The distributed environment: who am I, who are my peers, and the process group (one module, like dinov2's)."""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from invprop.collectives import Comm


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # slurm | torchrun | single
    local_world_size: int = 1  # ranks on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def resolve_host(host: str) -> str:
    """An address for a SLURM node name: DNS first, else the NodeAddr slurmctld knows (single-machine clusters)."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return host
    found = re.search(r"NodeAddr=(\S+)", out.stdout)
    return found.group(1) if found else host


def port_for_job(job_id: str) -> int:
    """A port every task of a job derives alike; spread over 20000-39999 so jobs on one node rarely clash."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank and rendezvous from torchrun-style variables, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
                       int(env.get("LOCAL_WORLD_SIZE", world)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        job = env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0")) + env.get("SLURM_ARRAY_TASK_ID", "")
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       resolve_host(first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))), port_for_job(job),
                       "slurm", tasks_on_this_node(env))
    return DistEnv()


def tasks_on_this_node(env: Mapping[str, str]) -> int:
    """Ranks of this SLURM step on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE list one count per
    node ('2(x3),1'), SLURM_NODEID says which is ours."""
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if found is None:
            return 1
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device, ranks_here: int, gpus_here: int) -> str:
    """NCCL when every rank on this machine has a GPU of its own; gloo on the CPU and when ranks share a GPU
    (NCCL refuses two ranks on one device; gloo stages CUDA tensors through host memory: slower, same values)."""
    if device.type != "cuda":
        return "gloo"
    return "nccl" if ranks_here <= gpus_here else "gloo"


def init(env: DistEnv, timeout_s: float = 120.0) -> Comm:
    """This process's `Comm`, built once (`backend_for` picks NCCL or gloo) for W > 1, where a dead peer ends
    collectives after `timeout_s` instead of hanging."""
    device = device_for(env)
    if env.world_size == 1:
        return Comm(device=device)
    if dist.is_initialized():  # a caller that set up the process group itself: its default group serves
        return Comm(env.rank, env.world_size, device, backend=dist.get_backend())
    backend = backend_for(device, env.local_world_size, torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Make NCCL raise instead of hanging when a peer disappears.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size, timeout=timeout)
    # A separate group keeps bank collectives apart from DDP's asynchronous gradient buckets.
    return Comm(env.rank, env.world_size, device, group=dist.new_group(backend=backend, timeout=timeout),
                control=dist.new_group(backend="gloo", timeout=timeout), backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
