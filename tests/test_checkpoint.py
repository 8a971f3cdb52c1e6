"""Committed checkpoints: only COMMITTED, intact directories load; a killed save never costs the previous one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from invprop import checkpoint

pytestmark = pytest.mark.timeout(120)


def _save(root: Path, step: int, rows: int = 10) -> Path:
    bank = torch.full((rows, 4), float(step))
    return checkpoint.save(root, step, 0, 1, {"step": step, "w": torch.ones(3) * step}, bank, 0, rows)


def test_newest_committed_is_loaded_and_old_ones_pruned(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _save(tmp_path, step)
    assert [d.name for d in checkpoint.step_dirs(tmp_path)] == ["step_40", "step_30", "step_20"]  # keep=3
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step_40"
    assert checkpoint.load_state(latest)["step"] == 40
    assert torch.equal(checkpoint.load_bank_shard(latest, 10, 0, 1), torch.full((10, 4), 40.0))


def test_directory_without_marker_is_never_loaded(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    partial = _save(tmp_path, 20)
    (partial / checkpoint.MARKER).unlink()
    assert checkpoint.latest(tmp_path).name == "step_10"


def test_saving_the_same_step_twice_stays_loadable(tmp_path: Path, recwarn) -> None:
    """A periodic save on the last step, then the final save of that step: the second manifest must not list
    the first COMMITTED (whose size changes when it is rewritten)."""
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _save(tmp_path, 20)
    assert checkpoint.latest(tmp_path).name == "step_20"
    assert not [w for w in recwarn if "corrupt" in str(w.message)]


def test_truncated_newest_is_skipped_with_warning(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert checkpoint.latest(tmp_path).name == "step_10"


def test_loads_use_weights_only(tmp_path: Path) -> None:
    """A checkpoint is data: an object that would run code on unpickling is refused."""
    directory = _save(tmp_path, 10)
    torch.save({"evil": subprocess.Popen}, directory / "state.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.load_state(directory)


KILLER = """
import sys, torch
from invprop import checkpoint
root = sys.argv[1]
bank = torch.randn(4_000_000, 32)  # ~500 MB: the save takes long enough to be killed midway
print("saving", flush=True)
checkpoint.save(root, 99, 0, 1, {"step": 99}, bank, 0, bank.shape[0])
"""


def test_kill_during_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    deadline = time.monotonic() + 60
    partial = tmp_path / "step_99"
    while not (partial.exists() and any(p.name.startswith(".bank") for p in partial.iterdir())):
        assert time.monotonic() < deadline, "the save never started writing its shard"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "step_99" / checkpoint.MARKER).exists()
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step_10" and checkpoint.load_state(latest)["step"] == 10
