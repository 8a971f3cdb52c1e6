"""Preemption on the real local SLURM cluster: USR2 -> committed save -> requeue -> exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from invprop import checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm]
# 960 / 48 = 20 steps per epoch, 2 epochs; deterministic on the CPU
RUN = ["data=synthetic", "data.n_train=960", "data.n_test=128", "train.batch_size=48", "train.epochs=2",
       "deterministic=true", "train.num_workers=0", "train.log_every=1", "method.warmup_epochs=1",
       "method.n_pos=10"]


def _launch(env, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *RUN, *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in _metrics(run) if "loss" in r]


# slow (CI runs it): ~40 s of SLURM requeue and scheduling; the local stop / resume equality
# (tests/test_train.py) stays in the default suite
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stop_requeue_mid_epoch_ends_equal_to_uninterrupted(slurm_cluster, tmp_path: Path) -> None:
    """train.stop_at_step=29 raises USR2 in both ranks at step 29 (mid-epoch 1, L_inv on and the graph filled):
    the committed save, submitit's requeue and the resume all run for real, at a known step. One requeue proves
    what several would; SLURM's own USR2 (the time limit) is the extended test below."""
    run = tmp_path / "run"
    proc = _launch(slurm_cluster.env, "cluster=slurm", "nodes=2", "gpus=1", "cluster.timeout_min=20",
                   "train.stop_at_step=29", f"out_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the uninterrupted reference (same 2 ranks, locally) runs while SLURM stops, requeues and resumes the job
    reference = tmp_path / "reference"
    proc = _launch(slurm_cluster.env, "gpus=2", f"out_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads((run / "jobs.json").read_text())["jobs"]
    ev = slurm_cluster.wait_sacct(jobs["eval_knn"], timeout=420)
    assert ev["State"] == "COMPLETED", ev
    assert slurm_cluster.sacct(jobs["pretrain"])["State"] == "COMPLETED"
    results = json.loads((run / "results.json").read_text())
    assert results["slurm_restart_count"] == 1
    # the stop's committed checkpoint, then the final one
    assert [checkpoint.step_of(d) for d in checkpoint.step_dirs(run / "checkpoints")] == [40, 29]
    assert _steps(run) == list(range(1, 41))  # no step repeated or skipped
    assert results["state_digest"] == json.loads((reference / "results.json").read_text())["state_digest"]


# a linear probe (3 epochs of 3 steps) and a 10% fine-tune (2 epochs of 6 steps), both small enough for CI
EVALS = ["eval.protocols=[linear,semisup]", "eval.untrained_baseline=false", "eval.linear.epochs=3",
         "eval.linear.lrs=[0.1]", "eval.linear.val_fraction=0", "eval.semisup.fractions=[0.1]",
         "eval.semisup.epochs=2", "eval.semisup.batch_size=16"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluations_stopped_mid_protocol_requeue_and_end_equal(slurm_cluster, tmp_path: Path) -> None:
    """eval.stop_at_step=4 raises USR2 in the linear probe (mid-epoch 2) and in the fine-tune (mid-epoch 1): each
    evaluation job commits its evaluation checkpoint, submitit requeues it, and the resumed job ends with the
    head / network of an uninterrupted evaluation of the same pretraining (bit-equal digests: no step repeated or
    skipped)."""
    run = tmp_path / "run"
    proc = _launch(slurm_cluster.env, "cluster=slurm", "cluster.timeout_min=20", *EVALS, "eval.stop_at_step=4",
                   f"out_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = tmp_path / "reference"  # the same chain locally, never stopped
    proc = _launch(slurm_cluster.env, *EVALS, f"out_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads((run / "jobs.json").read_text())["jobs"]
    for name in ("eval_linear", "eval_semisup"):
        assert slurm_cluster.wait_sacct(jobs[name], timeout=600)["State"] == "COMPLETED", name
    results = json.loads((run / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert results["state_digest"] == expected["state_digest"]
    assert results["eval_linear_slurm_restart_count"] == 1 and results["eval_semisup_slurm_restart_count"] == 1
    for key in ("linear_head_digest", "linear_top1", "semisup_10pct_digest", "semisup_10pct_top1"):
        assert results[key] == expected[key], key
    assert not (run / "eval").exists()  # finished evaluations leave no evaluation checkpoint behind


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(900)
def test_time_limit_requeue_resumes_and_finishes(slurm_cluster, tmp_path: Path) -> None:
    """timeout_min=2 with a short signal delay: USR2 comes before the limit, the job requeues and finishes.

    The run must outlast the ~75 s before USR2 on any machine: 1,200 steps take ~150 s on an idle 2-core box
    (600 once finished before the signal there)."""
    run = tmp_path / "run"
    proc = _launch(slurm_cluster.env, "cluster=slurm", "cluster.timeout_min=2", "cluster.signal_delay_s=45",
                   "data.n_train=4800", "train.epochs=12", "train.log_every=10", f"out_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads((run / "jobs.json").read_text())["jobs"]
    ev = slurm_cluster.wait_sacct(jobs["eval_knn"], timeout=840)
    assert ev["State"] == "COMPLETED"
    results = json.loads((run / "results.json").read_text())
    assert results["slurm_restart_count"] >= 1 and results["steps"] == 1200
