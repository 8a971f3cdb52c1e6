"""State of a run's (or a sweep's) SLURM jobs from sacct, with restarts and results."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from invprop.results import RunResults


def sacct_records(job_ids: list[str], slurm_conf: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Every allocation record (requeued runs included, -D) per job id, oldest first.

    ``slurm_conf``: the SLURM_CONF the jobs were submitted with (from jobs.json), so that sacct asks the cluster
    that ran them whatever this shell's environment says; None: the environment's (or Slurm's default)."""
    if not job_ids:
        return {}
    env = {**os.environ, "SLURM_CONF": slurm_conf} if slurm_conf and Path(slurm_conf).is_file() else None
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(job_ids),
                          "--format=JobID,State,Elapsed,Start,End,ExitCode"],
                         capture_output=True, text=True, timeout=30, env=env)
    records: dict[str, list[dict[str, str]]] = {j: [] for j in job_ids}
    for line in out.stdout.splitlines():
        job, state, elapsed, start, end, code = line.split("|")
        if job in records:
            records[job].append({"state": state.split()[0], "elapsed": elapsed, "start": start, "end": end,
                                 "exit": code})
    return records


def find_runs(path: Path) -> list[Path]:
    """A run directory (with jobs.json) or the run directories under a sweep directory."""
    path = Path(path)
    if (path / "jobs.json").exists():
        return [path]
    return sorted((p.parent for p in path.glob("*/jobs.json")), key=lambda p: (len(p.name), p.name))


def job_rows(run_dir: Path) -> list[dict[str, Any]]:
    record = json.loads((run_dir / "jobs.json").read_text())
    jobs = record["jobs"]
    records = sacct_records(list(jobs.values()), record.get("slurm_conf"))
    results = RunResults.read(run_dir).to_dict()
    rows = []
    for role, job_id in sorted(jobs.items(), key=lambda item: (item[0] != "pretrain", item[0])):
        recs = records.get(job_id) or [{"state": "UNKNOWN", "elapsed": "", "start": "", "end": "", "exit": ""}]
        last = recs[-1]
        state = last["state"]
        if state == "CANCELLED" and role != "pretrain":
            pre = records.get(jobs.get("pretrain", ""), [{}])[-1].get("state", "")
            state = f"CANCELLED (pretrain {pre})" if pre in ("FAILED", "CANCELLED", "TIMEOUT") else state
        rows.append({"run": run_dir.name, "role": role, "job_id": job_id, "state": state,
                     "restarts": len(recs) - 1, "elapsed": last["elapsed"], "start": last["start"],
                     "end": last["end"],
                     "result": _result_for(role, results)})
    return rows


def _result_for(role: str, results: dict[str, Any]) -> str:
    if role == "pretrain" and "final_train_loss" in results:
        return f"loss {results['final_train_loss']:.3f}"
    if role == "eval_knn" and "knn_top1" in results:
        return f"kNN {results['knn_top1']:.4f} (bank {results.get('knn_bank_top1', float('nan')):.4f})"
    if role == "eval_linear" and "linear_top1" in results:
        return f"linear {results['linear_top1']:.4f} / top-5 {results['linear_top5']:.4f}"
    if role == "eval_semisup":
        found = [f"{k.split('_')[1]} {results[k]:.4f}" for k in sorted(results) if k.startswith("semisup_")
                 and k.endswith("_top1")]
        return "semisup " + ", ".join(found) if found else ""
    return ""
