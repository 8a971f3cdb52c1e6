"""launchers/submit.py against the real local SLURM cluster: chained evaluation, arrays, failures, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
SMALL = ["data=synthetic", "train.epochs=1", "train.batch_size=64", "train.num_workers=0"]


def _launch(cluster, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *overrides], cwd=cwd, env=cluster.env,
                          capture_output=True, text=True, timeout=240)


def _jobs(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "jobs.json").read_text())["jobs"]


def _status(cluster, path: Path, env: dict[str, str] | None = None) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "tools/status.py"), str(path), "--json"],
                         env=env or cluster.env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_two_node_pretrain_then_chained_eval(slurm_cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _launch(slurm_cluster, "cluster=slurm", "nodes=2", "gpus=1", *SMALL, "eval.protocols=[knn,linear]",
                   "eval.linear.epochs=3", f"out_dir={run}")
    returned = datetime.now().isoformat(timespec="seconds")  # sacct's format and clock (local time, this host)
    assert proc.returncode == 0, proc.stderr
    jobs = _jobs(run)
    assert set(jobs) == {"pretrain", "eval_knn", "eval_linear"}
    assert "pretrain" in proc.stdout and jobs["eval_knn"] in proc.stdout and jobs["eval_linear"] in proc.stdout
    pre = slurm_cluster.wait_sacct(jobs["pretrain"], timeout=200)
    assert pre["State"] == "COMPLETED", pre
    assert pre["NodeList"] == "node[1-2]"
    assert pre["End"] > returned, (pre, returned)  # the launcher returned before pretraining ended: it never waits
    for role in ("eval_knn", "eval_linear"):
        ev = slurm_cluster.wait_sacct(jobs[role], timeout=120)
        assert ev["State"] == "COMPLETED", (role, ev)
        assert ev["Start"] >= pre["End"]  # ISO timestamps: each evaluation began only after pretraining ended
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and 0 <= results["knn_top1"] <= 1 and 0 <= results["linear_top1"] <= 1
    # written by the evaluation jobs from the final committed checkpoint
    assert results["eval_knn_checkpoint"] == results["eval_linear_checkpoint"] == f"step_{results['steps']}"
    rows = {r["role"]: r for r in _status(slurm_cluster, run)}
    assert {r["state"] for r in rows.values()} == {"COMPLETED"}
    assert rows["eval_linear"]["result"].startswith("linear ")


def _fmnist_corrupt_inside(root: Path) -> Path:
    """Fashion-MNIST whose training images are damaged mid-stream: headers and sizes pass the launcher's
    up-front checks, so the job is submitted, and the pretraining job fails when it decompresses them."""
    root.mkdir()
    for src in sorted(Path("/usr/share/datasets/fashion-mnist").glob("*.gz")):
        shutil.copy(src, root / src.name)
    images = root / "train-images-idx3-ubyte.gz"
    data = bytearray(images.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    images.write_bytes(bytes(data))
    return root


def test_failed_pretrain_cancels_its_evaluation(slurm_cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    root = _fmnist_corrupt_inside(tmp_path / "fmnist")
    proc = _launch(slurm_cluster, "cluster=slurm", "data=fashion_mnist", f"data.root={root}",
                   "data.format=torchvision", "train.epochs=1", f"out_dir={run}")
    assert proc.returncode == 0, proc.stderr
    jobs = _jobs(run)
    assert slurm_cluster.wait_sacct(jobs["pretrain"], timeout=120)["State"] == "FAILED"
    assert slurm_cluster.wait_sacct(jobs["eval_knn"], timeout=60)["State"] == "CANCELLED"
    assert slurm_cluster.squeue(jobs["eval_knn"]) is None  # not left pending forever
    # jobs.json names the cluster the jobs went to: status finds them from a shell without SLURM_CONF
    assert json.loads((run / "jobs.json").read_text())["slurm_conf"] == str(slurm_cluster.slurm_conf)
    bare_env = {k: v for k, v in slurm_cluster.env.items() if k != "SLURM_CONF"}
    rows = {r["role"]: r for r in _status(slurm_cluster, run, bare_env)}
    assert rows["pretrain"]["state"] == "FAILED"
    assert rows["eval_knn"]["state"] == "CANCELLED (pretrain FAILED)"
    assert not (run / "results.json").exists()


def test_array_sweep_runs_every_element_and_its_evaluation(slurm_cluster, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _launch(slurm_cluster, "-m", "hydra/launcher=slurm_array", "cluster=slurm", *SMALL, "method.k=3,4",
                   "method.n_pos=10", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "jobs.json").exists())
    assert [p.name for p in runs] == ["0", "1"]
    array_ids = {_jobs(r)["pretrain"].split("_")[0] for r in runs}
    assert len(array_ids) == 1  # one SLURM array
    for run, k in zip(runs, (3, 4), strict=True):
        ev = slurm_cluster.wait_sacct(_jobs(run)["eval_knn"], timeout=120)
        assert ev["State"] == "COMPLETED"
        assert "knn_top1" in json.loads((run / "results.json").read_text())
        assert f"k: {k}" in (run / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["nodes=0"], "nodes"),
        (["gpus=-1"], "gpus"),
        (["cluster.partition=nosuchpartition"], "cluster.partition"),
        (["train.bogus=1"], "train.bogus"),
    ],
)
def test_bad_overrides_submit_nothing(slurm_cluster, tmp_path: Path, overrides: list[str], field: str) -> None:
    before = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    proc = _launch(slurm_cluster, "cluster=slurm", *overrides, f"out_dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert field in proc.stdout + proc.stderr
    after = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    assert set(after) <= set(before)
    assert not (tmp_path / "run" / "jobs.json").exists()


def test_bad_sweep_element_submits_nothing(slurm_cluster, tmp_path: Path) -> None:
    before = slurm_cluster.run("sacct", "-X", "-n", "-o", "JobID").stdout.split()
    proc = _launch(slurm_cluster, "-m", "hydra/launcher=slurm_array", "cluster=slurm", *SMALL, "method.k=2,4",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 2 and "method.n_pos=20" in proc.stderr and "method.k=2" in proc.stderr
    assert slurm_cluster.run("sacct", "-X", "-n", "-o", "JobID").stdout.split() == before


def test_a_slurm_launch_is_refused_while_an_earlier_job_is_queued(slurm_cluster, tmp_path: Path) -> None:
    """One writer per run directory (issue 30): here, because squeue is shared with the other tests of this
    module, which run one at a time."""
    run = tmp_path / "run"
    run.mkdir()
    held = slurm_cluster.sbatch("--hold", "--wrap", "true")  # PENDING until released: an earlier launch's job
    try:
        (run / "jobs.json").write_text(json.dumps({"jobs": {"pretrain": held}}))
        proc = _launch(slurm_cluster, "cluster=slurm", *SMALL, f"out_dir={run}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        out = " ".join(proc.stdout.split())
        assert f"has SLURM jobs of an earlier launch still queued or running ({held} PENDING)" in out
        assert sorted(p.name for p in run.iterdir()) == ["jobs.json"]  # refused before anything was written
    finally:
        slurm_cluster.run("scancel", held, check=False)
