"""The evaluation world: one body run by W ranks (gloo) gives what one rank gives, on a real trained run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from invprop.jobs.evaluate import evaluate_rank, evaluate_run
from invprop.jobs.spawn import spawn_ranks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)
SMALL = ["data=synthetic", "data.n_train=384", "data.n_test=130", "train.batch_size=48", "train.epochs=2",
         "deterministic=true", "train.num_workers=0", "method.warmup_epochs=1", "method.n_pos=10",
         "eval.untrained_baseline=false"]
KNN_KEYS = ("knn_top1", "knn_backbone_top1", "knn_bank_top1")


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Pretrained locally, its final kNN through the evaluation body with eval.gpus=2 spawned ranks."""
    run = tmp_path_factory.mktemp("evalworld") / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *SMALL, "eval.gpus=2",
                           f"out_dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_knn_of_four_and_two_ranks_equals_one_rank(trained_run: Path) -> None:
    launched = _results(trained_run)
    assert launched["eval_knn_world_size"] == 2  # the launcher's final kNN ran in the evaluation world
    one = evaluate_run(trained_run, "knn")
    assert one["eval_knn_world_size"] == 1
    spawn_ranks(evaluate_rank, 4, (str(trained_run), "knn"), timeout_s=300)
    four = _results(trained_run)
    assert four["eval_knn_world_size"] == 4
    for key in KNN_KEYS:
        assert four[key] == one[key] == launched[key], key
    assert 0.3 < one["knn_top1"] <= 1.0  # 10 classes: a trained network is well above chance
