"""Rendezvous under SLURM: node lists expand as SLURM expands them, and the store's port is one the OS gave
rank 0, so two jobs on one node never share a port whatever their ids."""

from __future__ import annotations

import multiprocessing as mp
import subprocess

import pytest
import torch
import torch.distributed as dist

from invprop import distributed

pytestmark = pytest.mark.timeout(120)

NODE_LISTS = {
    "rack[1-2]-node[01-04]": "rack1-node01",  # two bracket groups: the old parser said 'rack1'
    "gpu[003-005,9],cpu1": "gpu003",
    "cpu1,gpu[003-005]": "cpu1",
    "node7": "node7",
    "r[08-10]c[1-2],login": "r08c1",
}


@pytest.mark.parametrize(("nodelist", "first"), list(NODE_LISTS.items()))
def test_node_lists_resolve_to_the_first_host_slurm_names(nodelist, first, slurm_cluster, monkeypatch) -> None:
    slurms = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                            check=True, env=slurm_cluster.env).stdout.split()
    assert distributed.expand_nodelist(nodelist) == slurms
    assert distributed.first_host(nodelist) == first == slurms[0]
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: submitit's parser must agree with SLURM
    assert distributed.expand_nodelist(nodelist) == slurms


def _rank(job_id: str, rank: int, rendezvous: str, out: mp.Queue) -> None:
    env = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
           "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "127.0.0.1"}
    me = distributed.read_env(env)
    comm = distributed.init(me, timeout_s=60, rendezvous_dir=rendezvous)
    total = torch.tensor([float(int(job_id) + rank)])
    dist.all_reduce(total)
    port = dist.distributed_c10d._get_default_store().underlying_store.port
    out.put((job_id, rank, port, total.item(), comm.world))
    distributed.shutdown()


def test_two_jobs_20000_ids_apart_on_one_node_get_their_own_ports(tmp_path) -> None:
    assert distributed.read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77",
                                 "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_RESTART_COUNT": "2"}).rendezvous_key \
        == "77.2"  # a requeued attempt never reads its predecessor's port
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(job, r, str(tmp_path / "rdv"), out)) for job in ("77", "20077")
             for r in range(2)]
    for p in procs:
        p.start()
    found = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    ports = {job: {port for j, _, port, _, _ in found if j == job} for job in ("77", "20077")}
    assert len(ports["77"]) == len(ports["20077"]) == 1 and ports["77"] != ports["20077"]
    # each job's all_reduce summed its own two ranks only
    assert sorted({(j, total) for j, _, _, total, _ in found}) == [("20077", 40155.0), ("77", 155.0)]
    assert list((tmp_path / "rdv").iterdir()) == []  # the published ports are removed once every rank joined
