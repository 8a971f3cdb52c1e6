"""Committed checkpoints: only COMMITTED, intact directories load; a killed save never costs the previous one."""

from __future__ import annotations

import json
import os
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


def test_saving_the_same_step_twice_stays_loadable(tmp_path: Path, capsys) -> None:
    """A periodic save on the last step, then the final save of that step: the second manifest must not list
    the first COMMITTED (whose size changes when it is rewritten)."""
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _save(tmp_path, 20)
    assert checkpoint.latest(tmp_path).name == "step_20"
    assert "corrupt" not in capsys.readouterr().err


def test_truncated_newest_is_skipped_with_warning(tmp_path: Path, capsys) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])
    assert checkpoint.latest(tmp_path).name == "step_10"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipping corrupt checkpoint") and "state.pt" in err[0]


def test_loads_use_weights_only(tmp_path: Path) -> None:
    """A checkpoint is data: an object that would run code on unpickling is refused."""
    directory = _save(tmp_path, 10)
    torch.save({"evil": subprocess.Popen}, directory / "state.pt")
    with pytest.raises(checkpoint.CorruptCheckpoint, match="state.pt cannot be loaded"):
        checkpoint.load_state(directory)


def _same_size(path: Path, payload: bytes) -> None:
    """Overwrite `path` with `payload` padded or cut to the old size, so only the content differs."""
    size = path.stat().st_size
    path.write_bytes((payload + b"\0" * size)[:size])


def _malicious_pickle() -> bytes:
    """A plain pickle that would call os.system on load (never executed: loads are weights_only)."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/invprop-pwned",))

    return pickle.dumps(Evil())


@pytest.mark.parametrize("name", ["state.pt", "bank.0-of-1"])
@pytest.mark.parametrize("content", ["garbage", "malicious", "truncated"])
def test_unreadable_file_falls_back_to_previous(tmp_path: Path, capsys, name: str, content: str) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    path = newest / name
    if content == "garbage":
        _same_size(path, os.urandom(64))
    elif content == "malicious":
        _same_size(path, _malicious_pickle())
    else:
        path.write_bytes(path.read_bytes()[:-7])
    assert checkpoint.latest(tmp_path).name == "step_10"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(path) in err[0]
    assert not Path("/tmp/invprop-pwned").exists()


def test_malicious_pickle_with_a_matching_manifest_is_still_corrupt(tmp_path: Path, capsys) -> None:
    """Sizes and hashes can be forged along with the file; the weights_only load still refuses it."""
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    (newest / "state.pt").write_bytes(_malicious_pickle())
    manifest = json.loads((newest / checkpoint.MARKER).read_text())
    manifest["files"]["state.pt"] = {"size": (newest / "state.pt").stat().st_size}
    (newest / checkpoint.MARKER).write_text(json.dumps(manifest))
    assert checkpoint.latest(tmp_path).name == "step_10"
    assert "state.pt cannot be loaded" in capsys.readouterr().err


def test_saving_a_committed_step_again_changes_nothing(tmp_path: Path) -> None:
    """A rerun of a finished command, or a periodic save on the last step, saves the same step twice."""
    first = _save(tmp_path, 16)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = checkpoint.save(tmp_path, 16, 0, 1, {"step": 16, "w": torch.zeros(3)}, torch.zeros(10, 4), 0, 10)
    assert second == first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert checkpoint.latest(tmp_path) == first and checkpoint.load_state(first)["step"] == 16
    manifest = json.loads((first / checkpoint.MARKER).read_text())
    assert sorted(manifest["files"]) == ["bank.0-of-1", "state.pt"]  # never the marker itself


def test_broken_committed_step_is_rewritten(tmp_path: Path) -> None:
    directory = _save(tmp_path, 16)
    _same_size(directory / "state.pt", b"junk")
    checkpoint.save(tmp_path, 16, 0, 1, {"step": 16, "w": torch.zeros(3)}, torch.zeros(10, 4), 0, 10)
    assert checkpoint.latest(tmp_path) == directory
    assert torch.equal(checkpoint.load_state(directory)["w"], torch.zeros(3))


def test_manifest_with_sizes_only_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before hashes were recorded."""
    directory = _save(tmp_path, 10)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.name != checkpoint.MARKER}
    (directory / checkpoint.MARKER).write_text(json.dumps({"step": 10, "world": 1, "files": files}))
    assert checkpoint.latest(tmp_path) == directory


def test_keep_one_keeps_the_newest_and_zero_is_refused(tmp_path: Path) -> None:
    bank = torch.zeros(10, 4)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, 0, 1, {"step": step}, bank, 0, 10, keep=1)
    assert [d.name for d in checkpoint.step_dirs(tmp_path)] == ["step_3"]
    with pytest.raises(ValueError, match="keep=0"):
        checkpoint.save(tmp_path, 4, 0, 1, {"step": 4}, bank, 0, 10, keep=0)
    assert checkpoint.latest(tmp_path).name == "step_3"


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """A newer broken checkpoint (the run fell back past it) must not count against `keep`."""
    _save(tmp_path, 10)
    broken = _save(tmp_path, 30)
    _same_size(broken / "state.pt", b"junk")
    checkpoint.save(tmp_path, 20, 0, 1, {"step": 20}, torch.zeros(10, 4), 0, 10, keep=1)
    assert (tmp_path / "step_20" / checkpoint.MARKER).exists()
    assert checkpoint.latest(tmp_path, report=False).name == "step_20"


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
