"""The distributed environment: who am I, who are my peers, and the process group (one module, like dinov2's)."""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from invprop.atomic import write_text_atomic
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
    # SLURM: the attempt's name ('<job>.<restart count>'); rank 0 publishes its store's port under it
    rendezvous_key: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a SLURM node list ('rack[1-2]-node[01-04],gpu7'), in SLURM's order.

    SLURM's own expansion (`scontrol show hostnames`) where scontrol is on PATH; else submitit's parser of the
    same grammar (a job step always has scontrol; the fallback serves torchrun-in-SLURM set-ups without it).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM_JOB_NODELIST")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts
    except (OSError, subprocess.TimeoutExpired):
        pass
    from submitit.slurm.slurm import _parse_node_list  # noqa: PLC0415 - the fallback only

    try:
        return _parse_node_list(nodelist)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user-facing problem
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}") from exc


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: where rank 0 runs (SLURM places task 0 on the first node)."""
    return expand_nodelist(nodelist)[0]


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


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank and rendezvous from torchrun-style variables, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
                       int(env.get("LOCAL_WORLD_SIZE", world)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        job = env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0"))
        if "SLURM_ARRAY_TASK_ID" in env:
            job += f"_{env['SLURM_ARRAY_TASK_ID']}"
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       resolve_host(first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))), 0,
                       "slurm", tasks_on_this_node(env), f"{job}.{env.get('SLURM_RESTART_COUNT', '0')}")
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


def init(env: DistEnv, timeout_s: float = 120.0, rendezvous_dir: Path | None = None) -> Comm:
    """This process's `Comm`, built once (`backend_for` picks NCCL or gloo) for W > 1, where a dead peer ends
    collectives after `timeout_s` instead of hanging. Under SLURM the ranks meet through `rendezvous_dir` (a
    folder every node sees: the run directory), where rank 0 publishes the port its store was given."""
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
    if env.source == "slurm":
        if rendezvous_dir is None:
            raise ValueError("a SLURM launch needs a rendezvous_dir that every node sees")
        published = Path(rendezvous_dir) / f"{env.rendezvous_key}.port"
        store = rendezvous_store(env, published, timeout_s)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
        if env.is_main:  # every rank has joined (init_process_group waited for them): the file has served
            published.unlink(missing_ok=True)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    # A separate group keeps bank collectives apart from DDP's asynchronous gradient buckets.
    return Comm(env.rank, env.world_size, device, group=dist.new_group(backend=backend, timeout=timeout),
                control=dist.new_group(backend="gloo", timeout=timeout), backend=backend)


def rendezvous_store(env: DistEnv, published: Path, timeout_s: float) -> dist.TCPStore:
    """The job's TCPStore. Rank 0 lets the OS pick a free port (so two jobs on one node can never share one,
    whatever their ids) and writes it to `published`; the other ranks wait for that file and connect."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.is_main:
        store = dist.TCPStore(env.master_addr, 0, env.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        published.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(published, json.dumps({"host": env.master_addr, "port": store.port}))
        return store
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            port = int(json.loads(published.read_text())["port"])
            return dist.TCPStore(env.master_addr, port, env.world_size, is_master=False, timeout=timeout)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            # not published yet, or a half-read file: rank 0 may still be importing; wait, up to the timeout
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {env.rank}: no rendezvous from rank 0 in {published} after "
                                   f"{timeout_s:.0f} s ({exc})") from exc
            time.sleep(0.2)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
