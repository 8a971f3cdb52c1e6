"""One writer per run directory (issue 30): a second launch on an out_dir that a launch or a queued SLURM job
still writes to is refused in one line, before it writes anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from invprop.config import ConfigError
from invprop.jobs.runlock import RunLock

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)
SMALL = ["data=synthetic", "data.n_train=96", "data.n_test=32", "train.batch_size=32", "train.epochs=1",
         "train.num_workers=0", "method.n_pos=5", "eval.untrained_baseline=false", "logger=none"]


def _launch(run: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *SMALL, *extra, f"out_dir={run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=150, env=env)


def test_a_second_launch_is_refused_while_the_first_holds_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunLock(run).acquire("launch"):  # this process stands for a launch that is training there
        proc = _launch(run)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = " ".join(proc.stdout.split())
    assert f"config error: out_dir={run} is in use by another launch (pid " in out and "choose another out_dir" in out
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [".writer.lock"]  # nothing of the refused launch written
    # released (as when the first launch ends, however it ends): the same command trains
    proc = _launch(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "FINISHED").exists()


def test_the_lock_is_one_holder_at_a_time_and_names_it(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire("SLURM job 42")
    with pytest.raises(ConfigError, match=r"in use by another SLURM job 42 \(pid \d+ on "):
        RunLock(tmp_path).acquire("launch")
    first.release()
    RunLock(tmp_path).acquire("launch").release()


def test_a_loss_that_becomes_nan_stops_the_run_in_one_line(tmp_path: Path) -> None:
    """lr 1e10 makes the loss NaN within a few steps: the run stops there, names the step, the terms and the
    settings in force, and does not mark the run finished (issue 30, item 5)."""
    run = tmp_path / "run"
    proc = _launch(run, "train.lr=1e10", "train.log_every=1", "train.epochs=2")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: loss nan at step ")
    assert "method.tau=" in lines[0] and "lower train.lr or raise method.tau" in lines[0]
    assert not (run / "FINISHED").exists() and "Traceback" not in proc.stderr
