"""The card's launch shape on the real local SLURM cluster, at CI's size: 4 nodes x 2 ranks train, a real
`scancel --signal=USR2` mid-run gives the collective save and submitit's requeue, the requeued job resumes,
the job is then cancelled outright and the same command at 4 x 1 ranks resumes it to the end and its chained
kNN job (tools/scale_slurm.py; tools/scale_check.sh runs it at 8 x 2 and 8 x 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_ranks_requeue_then_resume_at_four(slurm_cluster, tmp_path: Path) -> None:
    nodes = int(slurm_cluster.run("sinfo", "-h", "-o", "%D").stdout.split()[0])
    if nodes < 4:
        pytest.skip(f"the local cluster has {nodes} nodes; this test needs 4 (INVPROP_SLURM_NODES=4, the default)")
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/scale_slurm.py"), "--run-dir", str(tmp_path / "run"),
                           "--out", str(out), "--nodes", "4", "--gpus", "2"], cwd=ROOT, env=slurm_cluster.env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["rank_processes_seen"] == 8
    assert found["committed_on_usr2_step"] >= found["usr2_at_step"]  # saved at the next step boundary
    assert found["cancelled_at_step"] >= found["committed_on_usr2_step"] + 4  # the requeued job trained on
    assert found["results_world_size"] == 4 and found["resumed_job_state"] == "COMPLETED"
    assert found["knn_job_state"] == "COMPLETED" and found["steps"] == 24
    assert found["steps_contiguous"] and found["rank_processes_left"] == 0
