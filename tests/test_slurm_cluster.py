"""The local SLURM cluster behaves like a real one: multi-node jobs, submitit, afterok chains, requeue on USR2.

Needs root and the Debian Slurm packages; the fixture starts the cluster (slurm/local-cluster.sh up) if needed.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_fixtures import LocalSlurm, ensure_cluster  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]


@pytest.fixture(scope="session")
def cluster() -> LocalSlurm:
    return ensure_cluster()


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _submitit():
    submitit = pytest.importorskip("submitit")
    cloudpickle = pytest.importorskip("cloudpickle")
    # The job functions below live in this test module, which the job's interpreter cannot import by name:
    # ship them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return submitit


def _executor(submitit, folder: Path, **params):
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition="debug", nodes=1, tasks_per_node=1, cpus_per_task=1, mem_gb=8, timeout_min=5, **params
    )
    return executor


# ---------------------------------------------------------------------------------------------------------------
def test_two_node_job_has_real_multinode_environment(cluster: LocalSlurm, tmp_path: Path) -> None:
    script = f"""#!/bin/bash
srun bash -c 'echo "$SLURM_NODEID $SLURM_PROCID $SLURM_NNODES $SLURM_JOB_NODELIST $SLURMD_NODENAME" \\
    > {tmp_path}/task.$SLURM_PROCID'
"""
    job = cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", "--time=2", f"--output={tmp_path}/slurm-%j.out", script=script
    )
    record = cluster.wait_sacct(job, timeout=60)
    assert record["State"] == "COMPLETED", (record, (tmp_path / f"slurm-{job}.out").read_text())
    # slurmdbd may record the end before the full node list (for a second or two): let it settle
    deadline = time.monotonic() + 20
    while record["NodeList"] != "node[1-2]" and time.monotonic() < deadline:
        time.sleep(0.5)
        record = cluster.sacct(job)
    assert record["NodeList"] == "node[1-2]", record
    rows = sorted(p.read_text().split() for p in tmp_path.glob("task.*"))
    assert rows == [
        ["0", "0", "2", "node[1-2]", "node1"],
        ["1", "1", "2", "node[1-2]", "node2"],
    ]


# ---------------------------------------------------------------------------------------------------------------
def _add_and_describe(a: int, b: int) -> dict:
    return {
        "sum": a + b,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "node": os.environ.get("SLURMD_NODENAME"),
        "partition": os.environ.get("SLURM_JOB_PARTITION"),
    }


def test_submitit_returns_result_and_reaches_completed(cluster: LocalSlurm, tmp_path: Path) -> None:
    submitit = _submitit()
    job = _executor(submitit, tmp_path / "logs").submit(_add_and_describe, 20, 22)
    result = job.result()
    assert result == {"sum": 42, "job_id": job.job_id, "node": result["node"], "partition": "debug"}
    assert result["node"] in {"node1", "node2"}
    # submitit reads the state from sacct; force its (otherwise slowly refreshed) cache until it settles
    deadline = time.monotonic() + 30
    while job.get_info(mode="force").get("State") != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.state == "COMPLETED"
    assert cluster.sacct(job.job_id)["State"] == "COMPLETED"


# ---------------------------------------------------------------------------------------------------------------
def test_afterok_dependency_starts_after_parent_ends(cluster: LocalSlurm, tmp_path: Path) -> None:
    out = f"--output={tmp_path}/slurm-%j.out"
    parent = cluster.sbatch("--time=2", out, "--wrap", "sleep 4")
    child = cluster.sbatch(
        "--time=2", out, f"--dependency=afterok:{parent}", "--kill-on-invalid-dep=yes", "--wrap", "true"
    )
    queued = cluster.squeue(child)
    assert queued is not None and queued[0] == "PENDING" and queued[1] == "Dependency", queued
    parent_rec = cluster.wait_sacct(parent, timeout=60)
    child_rec = cluster.wait_sacct(child, timeout=60)
    assert parent_rec["State"] == "COMPLETED" and child_rec["State"] == "COMPLETED", (parent_rec, child_rec)
    assert _time(child_rec["Start"]) >= _time(parent_rec["End"]), (parent_rec, child_rec)


def test_afterok_dependency_of_failed_parent_never_runs(cluster: LocalSlurm, tmp_path: Path) -> None:
    """Slurm 22.05: with --kill-on-invalid-dep=yes the dependent is CANCELLED as soon as the parent fails;
    without it, it stays PENDING forever with reason DependencyNeverSatisfied."""
    out = f"--output={tmp_path}/slurm-%j.out"
    parent = cluster.sbatch("--time=2", out, "--wrap", "sleep 2; exit 3")
    killed = cluster.sbatch(
        "--time=2",
        out,
        f"--dependency=afterok:{parent}",
        "--kill-on-invalid-dep=yes",
        "--wrap",
        f"touch {tmp_path}/killed.ran",
    )
    stuck = cluster.sbatch("--time=2", out, f"--dependency=afterok:{parent}", "--wrap", f"touch {tmp_path}/stuck.ran")
    try:
        parent_rec = cluster.wait_sacct(parent, timeout=60)
        assert parent_rec["State"] == "FAILED" and parent_rec["ExitCode"] == "3:0", parent_rec
        killed_rec = cluster.wait_sacct(killed, {"CANCELLED"}, timeout=30)
        # never allocated, no batch step (sacct sets Start = End = the cancel time for such jobs)
        assert killed_rec["NodeList"] == "None assigned" and killed_rec["Elapsed"] == "00:00:00", killed_rec
        steps = cluster.run("sacct", "-n", "-P", "-j", killed, "-o", "JobID").stdout.split()
        assert steps == [killed], steps
        # the dependent without the flag is never started: it waits with DependencyNeverSatisfied
        deadline = time.monotonic() + 30
        while (queued := cluster.squeue(stuck)) != ("PENDING", "DependencyNeverSatisfied"):
            assert time.monotonic() < deadline, queued
            time.sleep(0.5)
        time.sleep(2)
        assert cluster.squeue(stuck) == ("PENDING", "DependencyNeverSatisfied")
        assert not (tmp_path / "killed.ran").exists() and not (tmp_path / "stuck.ran").exists()
    finally:
        cluster.run("scancel", stuck, check=False)


def _fail() -> None:
    raise RuntimeError("parent fails on purpose")


def _touch(path: str) -> str:
    Path(path).write_text("ran")
    return path


def test_submitit_afterok_chain_cancelled_when_parent_fails(cluster: LocalSlurm, tmp_path: Path) -> None:
    """The way invprop chains evaluation: additional_parameters dependency=afterok:<id>, kill_on_invalid_dep=yes
    (submitit writes `#SBATCH --kill-on-invalid-dep=yes`)."""
    submitit = _submitit()
    parent = _executor(submitit, tmp_path / "logs").submit(_fail)
    child_executor = _executor(
        submitit,
        tmp_path / "logs",
        slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}", "kill_on_invalid_dep": "yes"},
    )
    child = child_executor.submit(_touch, str(tmp_path / "child.ran"))
    assert "#SBATCH --kill-on-invalid-dep=yes" in child.paths.submission_file.read_text()
    with pytest.raises(submitit.core.utils.FailedJobError):
        parent.result()
    assert cluster.wait_sacct(parent.job_id, timeout=30)["State"] == "FAILED"
    assert cluster.wait_sacct(child.job_id, {"CANCELLED"}, timeout=30)["NodeList"] == "None assigned"
    deadline = time.monotonic() + 30
    while child.get_info(mode="force").get("State", "").split(" ")[0] != "CANCELLED":
        assert time.monotonic() < deadline, child.get_info(mode="cache")
        time.sleep(0.5)
    assert child.done()
    assert not (tmp_path / "child.ran").exists()


# ---------------------------------------------------------------------------------------------------------------
class _SleepUntilRequeued:
    """First run: sleep until preempted/timed out (USR2); after the requeue: report the restart."""

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir

    def __call__(self) -> dict:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        started = time.time()
        Path(self.marker_dir, f"started.{restart}").write_text(repr(started))
        if restart == 0:
            time.sleep(300)  # interrupted by the USR2 handler, which checkpoints and requeues
        return {"restart_count": restart, "started": started, "job_id": os.environ.get("SLURM_JOB_ID")}

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@pytest.mark.slow
@pytest.mark.extended  # submitit's own requeue; test_preemption_slurm proves ours end to end in CI
def test_usr2_requeues_checkpointable_job(cluster: LocalSlurm, tmp_path: Path) -> None:
    submitit = _submitit()
    markers = tmp_path / "markers"
    markers.mkdir()
    job = _executor(submitit, tmp_path / "logs").submit(_SleepUntilRequeued(str(markers)))
    deadline = time.monotonic() + 40
    while not (markers / "started.0").exists():
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # let submitit's signal handlers get installed (they are, before the function runs)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", job.job_id], env=cluster.env, check=True, timeout=30)
    result = job.result()
    latency = result["started"] - signalled
    print(f"\nUSR2 -> restart latency: {latency:.1f}s")
    assert result["restart_count"] == 1
    assert result["job_id"] == job.job_id
    assert 0 < latency < 90
    log = job.stdout() or ""
    assert "Caught signal SIGUSR2" in log, log[-3000:]
    assert cluster.wait_sacct(job.job_id, {"COMPLETED"}, timeout=30)["State"] == "COMPLETED"
