"""Training runs end to end on one machine: repeatability, exact resume after a stop, elastic resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invprop import checkpoint
from invprop.bank import ShardedBank
from invprop.collectives import Comm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
SMALL = ["data=synthetic", "data.n_train=384", "data.n_test=128", "train.batch_size=48", "train.epochs=2",
         "deterministic=true", "train.num_workers=0", "train.log_every=1", "method.warmup_epochs=1",
         "method.n_pos=10"]


def _launch(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """stdout piped, as in a job log (and no environment telling rich it is a terminal anyway)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *SMALL, *overrides, f"out_dir={run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = _launch(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run.parent / "stdout.log").write_text(proc.stdout)  # for the log-format test
    return run


def test_same_seed_same_digest_other_seed_differs(reference_run: Path, tmp_path: Path) -> None:
    """The repeat reads its batches from the resident images (data.format=device) instead of the torchvision
    loader: same crops, same pixels, so the same digest."""
    again, other = tmp_path / "again", tmp_path / "other"
    assert _launch(again, "data.format=device").returncode == 0
    assert _launch(other, "seed=1").returncode == 0
    digest = _results(reference_run)["state_digest"]
    assert _results(again)["state_digest"] == digest
    assert _results(other)["state_digest"] != digest
    assert _steps(reference_run) == list(range(1, 17))  # 384 / 48 = 8 steps per epoch, 2 epochs
    # what the bank's top-M ran: `auto` on the CPU is `bound`, and it measured nothing
    assert (_results(reference_run)["bank_selection"], _results(reference_run)["bank_selection_ms"]) == ("bound", {})


def test_piped_stdout_gets_plain_progress_lines_with_rate_and_eta(reference_run: Path) -> None:
    """A job log: a line at each epoch's end (8 steps per epoch here) with rate, ETA and monitors, the kNN feature
    passes too, and no rich bar squeezed into the log."""
    lines = (reference_run.parent / "stdout.log").read_text().splitlines()
    rate, took = r"\d+(\.\d+)?", r"\d+[smhd](\d\d[smh])?"
    training = [line for line in lines if line.startswith("pretrain")]
    assert len(training) == 2, training
    assert re.fullmatch(rf"pretrain step 8/16 \(epoch 1/2\) 50\.0%  {rate} step/s  ETA {took}  "
                        r"loss \d+\.\d{3}  ins \d+\.\d{3}  inv \d+\.\d{3}  lr \d\.\d{4}  \d+ img/s", training[0])
    assert re.fullmatch(rf"pretrain step 16/16 \(epoch 2/2\) 100\.0%  {rate} step/s  done in {took}  loss .* img/s",
                        training[1])
    assert any(re.fullmatch(rf"knn features train img 384/384 100\.0%  {rate} img/s  done in {took}", line)
               for line in lines)
    assert not [line for line in lines if "━" in line and ("pretrain" in line or "knn" in line)]


def test_stop_mid_epoch_then_rerun_equals_uninterrupted(reference_run: Path, tmp_path: Path) -> None:
    """train.stop_at_step raises the real USR2 at step 11 (mid-epoch 1: L_inv on, the graph filled); one stop
    and resume proves what several would. The rerun drops the key (a continuable change) and finishes."""
    run = tmp_path / "run"
    stopped = _launch(run, "train.stop_at_step=11")
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "stopped at step 11 with a committed checkpoint" in stopped.stdout
    assert checkpoint.latest(run / "checkpoints").name == "step_11" and _steps(run) == list(range(1, 12))
    proc = _launch(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step 11)" in proc.stderr
    assert _results(run)["state_digest"] == _results(reference_run)["state_digest"]
    assert _steps(run) == list(range(1, 17))  # no step repeated or skipped


@pytest.mark.slow  # ~45 s: CI runs it with the slow set
def test_elastic_resume_reshards_bank_row_for_row_and_records_the_changes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _launch(run, "gpus=2", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = checkpoint.latest(run / "checkpoints")
    shards = [torch.load(saved / f"bank.{r}-of-2", weights_only=True)["rows"] for r in range(2)]
    full = torch.cat(shards)
    for world in (1, 3):
        banks = [ShardedBank(384, 128, comm=Comm(r, world)) for r in range(world)]
        for bank in banks:
            checkpoint.load(saved, {"bank": bank})
        assert [b.rows.shape[0] for b in banks] == [b.n_local for b in banks]
        assert torch.equal(torch.cat([b.rows for b in banks]), full)
    # continue the same run on 3 ranks for a second epoch, at another lr: continuable changes, recorded
    proc = _launch(run, "gpus=3", "cluster.allow_oversubscribe=true", "train.epochs=2", "train.lr=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and _results(run)["world_size"] == 3
    assert (_results(run)["dist_backend"], _results(run)["epochs"]) == ("gloo", 2)
    assert _steps(run) == list(range(1, 17))
    history = json.loads((run / "config_history.json").read_text())
    assert len(history) == 1 and history[0]["resumed"]
    assert history[0]["changes"] == {"gpus": {"from": 2, "to": 3}, "train.epochs": {"from": 1, "to": 2},
                                     "train.lr": {"from": 0.03, "to": 0.05},
                                     "cluster.allow_oversubscribe": {"from": False, "to": True}}


def test_lr_warms_up_linearly_then_follows_the_cosine() -> None:
    from invprop.train.trainer import warmup_cosine_lr

    lrs = [warmup_cosine_lr(s, 0.4, total_steps=12, warmup_steps=4) for s in range(12)]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4] == pytest.approx(0.4) and lrs[4 + 4] == pytest.approx(0.2)  # half way through the cosine
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert [warmup_cosine_lr(s, 0.4, 12) for s in (0, 6)] == pytest.approx([0.4, 0.2])  # no warm-up: as before
