"""The evaluation world: one body run by W ranks (gloo) gives what one rank gives, on a real trained run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

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


def _set_eval(run: Path, **values) -> None:
    """Change the run's recorded eval settings (what every evaluation rank reads)."""
    cfg = OmegaConf.load(run / "config.yaml")
    for key, value in values.items():
        OmegaConf.update(cfg, f"eval.{key}", value, force_add=True)
    OmegaConf.save(cfg, run / "config.yaml")


LINEAR = {"linear.epochs": 4, "linear.batch_size": 64, "linear.lrs": [0.5], "linear.val_fraction": 0.0,
          "linear.aug_views": 1,
          "checkpoint_every_steps": 0, "stop_at_step": None}


def test_linear_probe_stopped_and_resumed_equals_uninterrupted_and_four_ranks_agree(trained_run: Path) -> None:
    _set_eval(trained_run, **LINEAR)
    whole = evaluate_run(trained_run, "linear")
    assert whole["linear_top1"] > 0.3  # 10 classes
    # stopped through the real USR2 handler at step 7 of 24 (6 batches of 64 per epoch), resumed from it
    _set_eval(trained_run, stop_at_step=7, checkpoint_every_steps=5)
    stopped = evaluate_run(trained_run, "linear")
    assert stopped == {"preempted_at_step": 7}
    saved = trained_run / "eval/linear/from_step_16"
    assert sorted(p.name for p in saved.iterdir()) == ["step_5", "step_7"]
    _set_eval(trained_run, stop_at_step=None)
    resumed = evaluate_run(trained_run, "linear")
    assert resumed["linear_head_digest"] == whole["linear_head_digest"]  # bit for bit: no step repeated/skipped
    assert resumed["linear_top1"] == whole["linear_top1"]
    assert not (trained_run / "eval/linear").exists()  # a finished probe leaves no checkpoint to resume
    # other settings never resume a stopped probe's checkpoint
    _set_eval(trained_run, stop_at_step=3)
    assert evaluate_run(trained_run, "linear") == {"preempted_at_step": 3}
    _set_eval(trained_run, stop_at_step=None, **{"linear.lrs": [0.25]})
    with pytest.raises(ValueError, match=r"cannot continue: lrs=\[0.25\] \(run has \[0.5\]\)"):
        evaluate_run(trained_run, "linear")
    _set_eval(trained_run, **LINEAR)
    shutil.rmtree(trained_run / "eval")
    # four gloo ranks, each featuring a quarter: within 0.1 point of one rank
    spawn_ranks(evaluate_rank, 4, (str(trained_run), "linear"), timeout_s=300)
    four = _results(trained_run)
    assert four["eval_linear_world_size"] == 4
    assert abs(four["linear_top1"] - whole["linear_top1"]) <= 0.001


SEMISUP = {"semisup.fractions": [0.1], "semisup.epochs": 3, "semisup.milestones": [2], "semisup.milestones_epochs": 3,
           "semisup.batch_size": 16, "semisup.lr": 0.05, "checkpoint_every_steps": 0, "stop_at_step": None}


def test_semisup_stopped_and_resumed_equals_uninterrupted_and_four_ranks_agree(trained_run: Path) -> None:
    _set_eval(trained_run, **SEMISUP)
    whole = evaluate_run(trained_run, "semisup")
    assert whole["semisup_10pct_labels"] == 40  # 4 per class, 10 classes: 2 batches of 16 per epoch
    _set_eval(trained_run, stop_at_step=3)
    assert evaluate_run(trained_run, "semisup") == {"preempted_at_step": 3}
    _set_eval(trained_run, stop_at_step=None)
    resumed = evaluate_run(trained_run, "semisup")
    assert resumed["semisup_10pct_digest"] == whole["semisup_10pct_digest"]
    assert resumed["semisup_10pct_top1"] == whole["semisup_10pct_top1"]
    spawn_ranks(evaluate_rank, 4, (str(trained_run), "semisup"), timeout_s=300)
    four = _results(trained_run)
    assert four["eval_semisup_world_size"] == 4
    assert abs(four["semisup_10pct_top1"] - whole["semisup_10pct_top1"]) <= 0.001


@pytest.mark.slow  # ~30 s of spawned ranks; in-process stop/resume equality stays in the default suite
def test_spawned_evaluation_stopped_writes_stopped_json_and_a_rerun_resumes_it(trained_run: Path) -> None:
    """eval.gpus=2 spawned ranks (evaluate_local, as cluster=local runs them), the online probe stopped by
    eval.stop_at_step: stopped.json says where, and rerunning evaluate_local resumes to the uninterrupted head."""
    from invprop.jobs.evaluate import evaluate_local

    online = {**LINEAR, "linear.mode": "online", "linear.epochs": 2, "linear.schedule": "step",
              "linear.milestones": [1], "gpus": 2}
    _set_eval(trained_run, **online)
    shutil.rmtree(trained_run / "eval", ignore_errors=True)
    whole = evaluate_local(trained_run, "linear", timeout_s=300)
    assert whole["eval_linear_world_size"] == 2
    _set_eval(trained_run, stop_at_step=5, checkpoint_every_steps=0)
    stopped = evaluate_local(trained_run, "linear", timeout_s=300)
    assert stopped == {"preempted_at_step": 5}
    assert json.loads((trained_run / "eval/linear/stopped.json").read_text()) == stopped
    _set_eval(trained_run, stop_at_step=None)
    resumed = evaluate_local(trained_run, "linear", timeout_s=300)
    assert resumed["linear_head_digest"] == whole["linear_head_digest"]
    assert resumed["linear_top1"] == whole["linear_top1"]
    assert not (trained_run / "eval/linear").exists()
    _set_eval(trained_run, gpus=None, **LINEAR)
