"""cluster=slurm: submit pretraining through submitit, chain evaluation with afterok, and return at once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import submitit
from rich.console import Console
from rich.table import Table

from invprop.config import Config, ConfigError, slurm_section
from invprop.config.schema import SlurmClusterConfig
from invprop.distributed import read_env
from invprop.jobs.evaluate import eval_world, evaluate_job
from invprop.jobs.pretrain import pretrain
from invprop.metrics import write_json_atomic


class PretrainJob:
    """Picklable job for submitit; on USR2 (timeout or preemption) submitit calls checkpoint() and requeues."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> dict:
        return pretrain(Path(self.run_dir), evaluate=False, hold_run_dir=True)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The restarted job resumes from the newest committed checkpoint in the run directory.
        return submitit.helpers.DelayedSubmission(PretrainJob(self.run_dir))


class EvalJob:
    """One task of the evaluation world (eval.nodes x eval.gpus tasks); ranks come from SLURM's environment.
    On USR2 the linear and semisup bodies save a committed evaluation checkpoint and submitit requeues."""

    def __init__(self, run_dir: str, protocol: str = "knn") -> None:
        self.run_dir, self.protocol = run_dir, protocol

    def __call__(self) -> dict:
        return evaluate_job(Path(self.run_dir), self.protocol)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The requeued job resumes from <run>/eval/<protocol>/'s newest committed checkpoint.
        return submitit.helpers.DelayedSubmission(EvalJob(self.run_dir, self.protocol))


def eval_timeout_min(cfg: Config, protocol: str) -> int:
    """`protocol`'s time limit per job: eval.timeout_min.<protocol>, or cluster.eval_timeout_min when null. A
    protocol that needs longer is carried on by the requeue (EvalJob.checkpoint), up to max_num_timeout times."""
    own = getattr(cfg.eval.timeout_min, protocol)
    return own if own is not None else slurm_section(cfg).eval_timeout_min


def evaluation_executors(cfg: Config, run_dir: Path, after: str) -> dict[str, submitit.AutoExecutor]:
    """{protocol: executor} for eval.protocols: each afterok on pretraining (cancelled if it fails), with
    eval.nodes x eval.gpus tasks (one GPU each where the cluster has GPUs) and the protocol's time limit."""
    cluster = slurm_section(cfg)
    nodes, ranks = eval_world(cfg)
    return {protocol: _executor(cfg, run_dir / "submitit", f"invprop-{protocol}-{run_dir.name}", nodes, ranks,
                                ranks if cluster.gpus_per_node else 0, eval_timeout_min(cfg, protocol),
                                dependency=f"afterok:{after}")
            for protocol in cfg.eval.protocols}


def submit_evaluations(cfg: Config, run_dir: Path, after: str) -> dict[str, submitit.Job]:
    """One job per protocol in eval.protocols (see :func:`evaluation_executors`)."""
    return {f"eval_{protocol}": ev.submit(EvalJob(str(run_dir), protocol))
            for protocol, ev in evaluation_executors(cfg, run_dir, after).items()}


def available_partitions() -> list[str] | None:
    """Partition names from sinfo, or None when sinfo is not installed here."""
    if shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        hint = "is the SLURM controller up?"
        if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists():
            # the local test cluster is reached only through SLURM_CONF; it never installs itself in /etc
            hint = ("no SLURM configuration here (SLURM_CONF is unset); for this checkout's local test cluster run: "
                    'eval "$(slurm/local-cluster.sh env)"')
        raise ConfigError(f"cluster=slurm: sinfo failed ({out.stderr.strip()}); {hint}")
    return sorted(set(out.stdout.split()))


def jobs_record(jobs: dict[str, str], logs: Path) -> dict:
    """What jobs.json holds; SLURM_CONF (when set) names the cluster the jobs went to, for tools/status.py."""
    record: dict = {"jobs": jobs, "logs": str(logs)}
    if os.environ.get("SLURM_CONF"):
        record["slurm_conf"] = str(Path(os.environ["SLURM_CONF"]).resolve())
    return record


ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


def active_jobs(run_dir: Path) -> dict[str, str]:
    """{job id: state} of the jobs jobs.json records for this run directory that SLURM still has queued or
    running (a second launch must not write beside them)."""
    record = Path(run_dir) / "jobs.json"
    if not record.exists() or shutil.which("squeue") is None:
        return {}
    try:
        ids = [str(j) for j in json.loads(record.read_text())["jobs"].values()]
    except (OSError, ValueError, KeyError, AttributeError):
        return {}
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True,
                         timeout=30)
    found = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] in ACTIVE_STATES:
            found[parts[0]] = parts[1]
    return found


def check_submission(cluster: SlurmClusterConfig, run_dir: Path) -> None:
    """What a SLURM launch checks before it writes anything: the cluster's settings, and that no job of an
    earlier launch on this run directory is still queued or running."""
    check_cluster(cluster)
    busy = active_jobs(run_dir)
    if busy:
        listed = ", ".join(f"{job} {state}" for job, state in busy.items())
        raise ConfigError(f"out_dir={run_dir} has SLURM jobs of an earlier launch still queued or running "
                          f"({listed}); wait for them or scancel them, or choose another out_dir")


def max_gpus_per_node(partition: str | None) -> int | None:
    """The most GPUs (gres gpu[:type]:n) any node of `partition` (or of the cluster) offers; None if unknown."""
    if shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-o", "%R %G"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return None
    most = 0
    for line in out.stdout.splitlines():
        name, _, gres = line.partition(" ")
        if partition is not None and name != partition:
            continue
        for item in gres.split(","):
            fields = item.split("(")[0].split(":")
            if fields[0] == "gpu" and fields[-1].isdigit():
                most = max(most, int(fields[-1]))
    return most


def check_cluster(cluster: SlurmClusterConfig) -> None:
    """Checks that need the cluster itself, still before anything is submitted."""
    if shutil.which("sbatch") is None:
        raise ConfigError("cluster=slurm: sbatch is not on PATH; run on a SLURM login node or use cluster=local")
    partitions = available_partitions()
    if cluster.partition is not None and partitions is not None and cluster.partition not in partitions:
        raise ConfigError(f"cluster.partition={cluster.partition} does not exist; available: {', '.join(partitions)}")
    wanted = cluster.gpus_per_node
    offered = max_gpus_per_node(cluster.partition) if wanted else None
    if offered is not None and wanted > offered:
        where = f"partition {cluster.partition}" if cluster.partition is not None else "this cluster"
        raise ConfigError(f"cluster.gpus_per_node={wanted} but no node of {where} has more than {offered} GPU(s); "
                          f"use cluster.gpus_per_node={offered}" + (" (CPU only)" if offered == 0 else ""))


def _executor(cfg: Config, folder: Path, name: str, nodes: int, tasks_per_node: int,
              gpus_per_node: int, timeout_min: int, dependency: str | None = None) -> submitit.AutoExecutor:
    cl = slurm_section(cfg)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cl.max_num_timeout)
    extra = dict(cl.additional_parameters or {})
    params = dict(name=name, nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cl.cpus_per_task,
                  mem_gb=cl.mem_gb, timeout_min=timeout_min, slurm_signal_delay_s=cl.signal_delay_s)
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cl, key) is not None:
            params[f"slurm_{key}"] = str(getattr(cl, key))
    if dependency:
        extra.update(dependency=dependency, kill_on_invalid_dep="yes")
    if extra:
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _outside_job_env() -> Iterator[None]:
    """sbatch exports our environment: hide this job's SLURM_* so the new job does not take them for its own."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "SUBMITIT_")) and k != "SLURM_CONF"}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def run_array_element(cfg: Config, run_dir: Path) -> int:
    """A sweep element: submit this element's evaluation (afterok on itself), then pretrain in this allocation."""
    env = read_env()
    if env.is_main:
        me = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        if "SLURM_ARRAY_TASK_ID" in os.environ:
            me = f"{me}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not (run_dir / "jobs.json").exists():  # a requeued element must not chain its evaluations twice
            with _outside_job_env():
                evals = submit_evaluations(cfg, run_dir, after=me)
            jobs = {"pretrain": me, **{role: job.job_id for role, job in evals.items()}}
            write_json_atomic(run_dir / "jobs.json", jobs_record(jobs, run_dir / "submitit"))
    pretrain(run_dir, evaluate=False, hold_run_dir=True)
    return 0


def submit_run(cfg: Config, run_dir: Path, console: Console) -> int:
    """Submit pretraining and its chained evaluation; print the jobs and return without waiting."""
    logs = run_dir / "submitit"
    cluster = slurm_section(cfg)
    pre = _executor(cfg, logs, f"invprop-pretrain-{run_dir.name}", cfg.nodes, cfg.gpus, cluster.gpus_per_node,
                    cluster.timeout_min).submit(PretrainJob(str(run_dir)))
    evals = submit_evaluations(cfg, run_dir, after=pre.job_id)
    jobs = {"pretrain": pre.job_id, **{role: job.job_id for role, job in evals.items()}}
    write_json_atomic(run_dir / "jobs.json", jobs_record(jobs, logs))
    table = Table(title="submitted")
    for col in ("role", "job id", "runs", "log"):
        table.add_column(col)
    table.add_row("pretrain", pre.job_id, f"{cfg.nodes} node(s) x {cfg.gpus} rank(s)", str(pre.paths.stdout))
    for role, job in evals.items():
        table.add_row(role, job.job_id, f"after pretrain succeeds (afterok:{pre.job_id})", str(job.paths.stdout))
    console.print(table)
    console.print(f"run dir: {run_dir}\nstatus:  .venv/bin/python tools/status.py {run_dir}")
    print(json.dumps({"run_dir": str(run_dir), "jobs": jobs}))
    return 0
