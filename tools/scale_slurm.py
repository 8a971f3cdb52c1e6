"""The card's launch at this machine's largest rank count, through the real local SLURM cluster (the slurm part
of tools/scale_check.sh, which brings an 8-node cluster up first; SLURM_CONF must point at it).

    python tools/scale_slurm.py --run-dir runs/scale_slurm --out /tmp/scale_slurm.json [--nodes 8 --gpus 2]

1. `launchers/submit.py cluster=slurm nodes=8 gpus=2` (16 ranks) on synthetic data with resnet_tiny; once it
   trains, the memory of every rank process is read (PSS: shared pages split between their users).
2. `scancel --signal=USR2` mid-run: the ranks save a committed checkpoint at the next step, submitit requeues
   the job, and the requeued job resumes from that step.
3. After a few more steps the job is cancelled outright (a node lost), and the same command with gpus=1 resumes
   the run at 8 ranks (half the ranks per node) from its newest committed checkpoint, to the end and its chained
   kNN job.
Checks: the metrics' steps are 1..last with none repeated or missing, results.json says 8 ranks, the kNN job
completed, and no rank process of any of the jobs is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN = ["cluster=slurm", "data=synthetic", "data.n_train=4096", "data.n_test=256", "model=resnet_tiny",
       "train.epochs=3", "train.batch_size=512", "train.num_workers=0", "train.log_every=1",
       "train.checkpoint_every_steps=3", "train.checkpoint_every_min=0", "cluster.timeout_min=30",
       "eval.untrained_baseline=false", "logger=none"]


def log(message: str) -> None:
    print(f"[scale_slurm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=120).stdout


def submit(run_dir: Path, nodes: int, gpus: int) -> dict[str, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *RUN, f"nodes={nodes}",
                           f"gpus={gpus}", f"out_dir={run_dir}"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"submit failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]


def steps(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def wait(what: str, done, timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = done()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def job_field(job: str, name: str) -> str:
    out = sh("scontrol", "show", "job", "-o", job, check=False)
    for token in out.split():
        if token.startswith(f"{name}="):
            return token.split("=", 1)[1]
    return ""


def sacct_state(job: str) -> str:
    out = sh("sacct", "-X", "-n", "-P", "-j", job, "-o", "State", check=False).split()
    return out[0] if out else ""


def rank_pids(run: Path) -> list[int]:
    """The rank processes of the run's jobs on this machine: submitit's job entry point started on the run's
    submitit folder (every local SLURM node is this host, so /proc sees them all)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if ("python" in Path(cmdline[0]).name and "submitit.core._submit" in cmdline  # not srun's own line
                and any(str(run) in arg for arg in cmdline)):
            pids.append(int(proc.name))
    return pids


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def used_mb() -> int:
    return int(sh("free", "-m").splitlines()[1].split()[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=2)
    args = parser.parse_args()
    if "SLURM_CONF" not in os.environ:
        raise SystemExit("SLURM_CONF is not set: run tools/scale_check.sh, or eval \"$(slurm/local-cluster.sh env)\"")
    run = args.run_dir.resolve()
    if run.exists():
        raise SystemExit(f"{run} exists: pick a new --run-dir")
    ranks = args.nodes * args.gpus
    result: dict[str, Any] = {"ranks": ranks, "nodes": args.nodes, "ranks_per_node": args.gpus, "overrides": RUN}
    base_used = used_mb()
    t_submit = time.time()
    jobs = submit(run, args.nodes, args.gpus)
    job = jobs["pretrain"]
    log(f"submitted {ranks} ranks: {jobs}")
    wait("the first steps", lambda: len(steps(run)) >= 4, 900)
    first = steps(run)[0]
    result["seconds_submit_to_first_step"] = first["time"] - t_submit
    pids = wait("every rank process", lambda: (lambda found: found if len(found) >= ranks else None)(rank_pids(run)),
                60, every=0.5)
    result["rank_processes_seen"] = len(pids)
    result["per_rank_pss_mb"] = sorted(round(pss_mb(p), 1) for p in pids)
    result["machine_used_mb_increase"] = used_mb() - base_used
    log(f"{len(pids)} rank processes, PSS {result['per_rank_pss_mb'][:3]}..., "
        f"used +{result['machine_used_mb_increase']} MB")

    sh("scancel", "--signal=USR2", job)
    result["usr2_at_step"] = steps(run)[-1]["step"]
    log(f"USR2 sent at step {result['usr2_at_step']}")
    wait("the requeue", lambda: job_field(job, "Restarts") not in ("", "0"), 600)
    stop_step = max(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    result["committed_on_usr2_step"] = stop_step
    wait("steps after the resume", lambda: steps(run) and steps(run)[-1]["step"] >= stop_step + 4, 900)
    rows = steps(run)
    result["seconds_per_step_16_ranks"] = (rows[-1]["time"] - rows[-4]["time"]) / (rows[-1]["step"] - rows[-4]["step"])
    sh("scancel", job, jobs["eval_knn"])  # the chained kNN job would be cancelled by its dependency anyway
    wait("the cancelled jobs to leave the queue", lambda: not rank_pids(run) and not sh(
        "squeue", "-h", "-j", f"{job},{jobs['eval_knn']}", check=False).strip(), 300)
    result["cancelled_at_step"] = steps(run)[-1]["step"]
    log(f"cancelled at step {result['cancelled_at_step']}; resuming with {args.gpus // 2 or 1} rank(s) per node")

    half = max(1, args.gpus // 2)
    jobs2 = submit(run, args.nodes, half)
    wait("the 8-rank run and its kNN job", lambda: sacct_state(jobs2["eval_knn"]) in
         ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 1800, every=5)
    final = json.loads((run / "results.json").read_text())
    all_steps = [r["step"] for r in steps(run)]
    result.update({
        "resume_ranks": args.nodes * half,
        "resumed_job_state": sacct_state(jobs2["pretrain"]),
        "knn_job_state": sacct_state(jobs2["eval_knn"]),
        "knn_top1": final.get("knn_top1"),
        "results_world_size": final.get("world_size"),
        "steps": final.get("steps"),
        "steps_contiguous": all_steps == list(range(1, len(all_steps) + 1)),
        "rank_processes_left": len(rank_pids(run)),
        "jobs": {"first": jobs, "resume": jobs2},
        "seconds_total": time.time() - t_submit,
    })
    args.out.write_text(json.dumps(result, indent=1))
    log(json.dumps({k: v for k, v in result.items() if k not in ("overrides", "jobs")}))


if __name__ == "__main__":
    main()
