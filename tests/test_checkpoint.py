"""Committed checkpoints: only COMMITTED, intact directories load; a killed save never costs the previous one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from invprop import checkpoint
from invprop.bank import ShardedBank
from invprop.collectives import Comm
from invprop.config import compose_defaults, typed
from invprop.config.identity import run_identity
from invprop.data.order import DataPosition
from invprop.graph import NeighbourGraph
from invprop.state import RunIdentity, TorchRng
from invprop.train.trainer import TrainState

pytestmark = pytest.mark.timeout(120)


class Box:
    """A replicated checkpoint part holding a few values."""

    def __init__(self, **values) -> None:
        self.values = values

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values = dict(state)


def _bank(rows: int, value: float, comm: Comm | None = None) -> ShardedBank:
    bank = ShardedBank(rows, 4, comm=comm)
    bank.load_state_dict({"rows": torch.full((bank.n_local, 4), value), "start": bank.start, "n": rows})
    return bank


def _parts(step: int, rows: int = 10, w: torch.Tensor | None = None) -> dict:
    return {"box": Box(step=step, w=torch.ones(3) * step if w is None else w), "bank": _bank(rows, float(step))}


def _save(root: Path, step: int, rows: int = 10) -> Path:
    return checkpoint.save(root, step, _parts(step, rows))


def _loaded(directory: Path, rows: int = 10) -> dict:
    box, bank = Box(), ShardedBank(rows, 4)
    checkpoint.load(directory, {"box": box, "bank": bank})
    return {**box.values, "bank": bank.rows}


def test_newest_committed_is_loaded_and_old_ones_pruned(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _save(tmp_path, step)
    assert [d.name for d in checkpoint.step_dirs(tmp_path)] == ["step_40", "step_30", "step_20"]  # keep=3
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step_40"
    loaded = _loaded(latest)
    assert loaded["step"] == 40 and torch.equal(loaded["w"], torch.full((3,), 40.0))
    assert torch.equal(loaded["bank"], torch.full((10, 4), 40.0))


def test_bank_reshards_from_any_world_size() -> None:
    """Each rank saves its own shard; a rank of another world size takes exactly its rows from them."""
    n = 23
    full = torch.randn(n, 4)
    for saved_world in (1, 2, 3):
        shards = []
        for r in range(saved_world):
            bank = ShardedBank(n, 4, comm=Comm(r, saved_world))
            bank.load_shards([{"rows": full, "start": 0, "n": n}])
            shards.append(bank.state_dict())
            assert set(shards[-1]) == {"rows", "start", "n"} and shards[-1]["start"] == bank.start
        for world in (1, 2, 4):
            banks = [ShardedBank(n, 4, comm=Comm(r, world)) for r in range(world)]
            for bank in banks:
                bank.load_shards(shards)
            assert torch.equal(torch.cat([b.rows for b in banks]), full), (saved_world, world)
    with pytest.raises(ValueError, match="has a bank of 23 rows, this run has 24"):
        ShardedBank(24, 4).load_shards(shards)
    with pytest.raises(ValueError, match="is missing bank rows 0..23"):
        ShardedBank(n, 4).load_state_dict(shards[0])  # one shard of four does not cover a world of one


def test_state_file_holds_each_part_under_its_name_and_parts_round_trip(tmp_path: Path) -> None:
    """state.pt is each replicated part's state_dict under the part's name (tools read state.pt["model"]); the
    sharded bank is beside it. Loading puts every part back."""
    model = torch.nn.Linear(3, 2)
    graph = NeighbourGraph(10, 2)
    graph.update(torch.tensor([1, 4]), torch.tensor([[2, 3], [5, 6]]))
    train, position = TrainState(step=13), DataPosition(num_batches=5, epoch=2, batch=3)
    parts = {"model": model, "bank": _bank(10, 1.0), "graph": graph, "train": train, "data": position,
             "rng": TorchRng()}
    directory = checkpoint.save(tmp_path, 13, parts)
    saved = checkpoint.load_state(directory)
    assert set(saved) == {"model", "graph", "train", "data", "rng"}
    assert saved["train"] == {"step": 13} and saved["data"] == {"epoch": 2, "batch": 3}
    assert torch.equal(saved["graph"]["table"], graph.table)
    assert torch.equal(saved["rng"]["torch"], torch.get_rng_state())
    assert sorted(json.loads((directory / checkpoint.MARKER).read_text())["files"]) == ["bank.0-of-1", "state.pt"]

    rng = torch.get_rng_state()
    torch.rand(5)  # moves the generator on
    other, other_position = TrainState(), DataPosition(num_batches=5)
    fresh = {"model": torch.nn.Linear(3, 2), "bank": ShardedBank(10, 4), "graph": NeighbourGraph(10, 2),
             "train": other, "data": other_position, "rng": TorchRng()}
    checkpoint.load(directory, fresh)
    assert (other_position.epoch, other_position.batch, other.step) == (2, 3, 13)
    assert torch.equal(fresh["graph"].table, graph.table) and torch.equal(fresh["bank"].rows, torch.ones(10, 4))
    assert torch.equal(fresh["model"].weight, model.weight) and torch.equal(torch.get_rng_state(), rng)


def test_a_part_that_does_not_fit_names_the_checkpoint(tmp_path: Path) -> None:
    directory = checkpoint.save(tmp_path, 7, {"train": TrainState(step=7),
                                              "data": DataPosition(num_batches=8, batch=7)})
    with pytest.raises(ValueError, match=f"checkpoint {directory} stopped at batch 7 of an epoch, but this run "
                                         "has 4 batches per epoch"):
        checkpoint.load(directory, {"train": TrainState(), "data": DataPosition(num_batches=4)})
    with pytest.raises(ValueError, match="has no 'model'"):
        checkpoint.load(directory, {"model": torch.nn.Linear(3, 2)})


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
        checkpoint.load(directory, {"box": Box()})


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
    forged = (newest / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"size": len(forged), "sha256": hashlib.sha256(forged).hexdigest()}
    (newest / checkpoint.MARKER).write_text(json.dumps(manifest))
    assert checkpoint.latest(tmp_path).name == "step_10"
    assert "state.pt cannot be loaded" in capsys.readouterr().err


def test_saving_a_committed_step_again_changes_nothing(tmp_path: Path) -> None:
    """A rerun of a finished command, or a periodic save on the last step, saves the same step twice."""
    first = _save(tmp_path, 16)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = checkpoint.save(tmp_path, 16, _parts(16, w=torch.zeros(3)))
    assert second == first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert checkpoint.latest(tmp_path) == first and _loaded(first)["step"] == 16
    manifest = json.loads((first / checkpoint.MARKER).read_text())
    assert sorted(manifest["files"]) == ["bank.0-of-1", "state.pt"]  # never the marker itself


def test_broken_committed_step_is_rewritten(tmp_path: Path) -> None:
    directory = _save(tmp_path, 16)
    _same_size(directory / "state.pt", b"junk")
    checkpoint.save(tmp_path, 16, _parts(16, w=torch.zeros(3)))
    assert checkpoint.latest(tmp_path) == directory
    assert torch.equal(_loaded(directory)["w"], torch.zeros(3))


def test_manifest_with_sizes_only_is_refused(tmp_path: Path) -> None:
    """A manifest without hashes (as written before they were recorded) cannot vouch for its files."""
    directory = _save(tmp_path, 10)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.name != checkpoint.MARKER}
    (directory / checkpoint.MARKER).write_text(json.dumps({"step": 10, "world": 1, "files": files}))
    assert checkpoint.problem(directory) == f"unreadable {directory / checkpoint.MARKER} (an entry has no sha256)"
    assert checkpoint.latest(tmp_path, report=False) is None


def test_keep_one_keeps_the_newest_and_zero_is_refused(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _parts(step), keep=1)
    assert [d.name for d in checkpoint.step_dirs(tmp_path)] == ["step_3"]
    with pytest.raises(ValueError, match="keep=0"):
        checkpoint.save(tmp_path, 4, _parts(4), keep=0)
    assert checkpoint.latest(tmp_path).name == "step_3"


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """A newer broken checkpoint (the run fell back past it) must not count against `keep`."""
    _save(tmp_path, 10)
    broken = _save(tmp_path, 30)
    _same_size(broken / "state.pt", b"junk")
    checkpoint.save(tmp_path, 20, _parts(20), keep=1)
    assert (tmp_path / "step_20" / checkpoint.MARKER).exists()
    assert checkpoint.latest(tmp_path, report=False).name == "step_20"


KILLER = """
import resource
import signal
import sys
from invprop import checkpoint
from invprop.bank import ShardedBank


class Gate:
    # a replicated part: the save asks for its state after every shard is on disk, before the commit
    def state_dict(self):
        print("shards written", flush=True)
        sys.stdin.readline()  # never answered: the process is killed here
        return {}

    def load_state_dict(self, state):
        pass


root, stop, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # go
bank = ShardedBank(4096, 32)  # 512 KiB
if stop == "mid-shard-write":  # the kernel ends the process (SIGXFSZ) when a write passes this size
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it, which would turn the kill into an OSError
checkpoint.save(root, 99, {"bank": bank, **({"gate": Gate()} if stop == "before-commit" else {})})
"""
LIMIT = 65536  # bytes of the shard that reach the disk before the kill


@pytest.mark.parametrize("stop", ["mid-shard-write", "before-commit"])
def test_kill_during_save_leaves_previous_checkpoint(tmp_path: Path, stop: str) -> None:
    """The saving process is killed at a known point, reached without timing: by the kernel at a fixed byte of
    its shard's write (a file-size limit; SIGXFSZ), or with every shard in place but the commit not yet
    written (it waits on a pipe inside the save and is killed there)."""
    _save(tmp_path, 10)
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path), stop, str(LIMIT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    partial = tmp_path / "step_99"
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if stop == "mid-shard-write":
            assert proc.wait() == -signal.SIGXFSZ
        else:
            assert proc.stdout.readline().strip() == "shards written"
            assert (partial / "bank.0-of-1").exists()
    finally:
        proc.kill()
        proc.wait()
    assert not (partial / checkpoint.MARKER).exists()
    assert (partial / "bank.0-of-1").exists() == (stop == "before-commit")
    if stop == "mid-shard-write":
        # the kill ended the write: the temporary file holds the bytes up to the limit, and the writer's own
        # clean-up never ran
        assert [p.stat().st_size for p in partial.glob(".bank.0-of-1.*.tmp")] == [LIMIT]
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step_10" and _loaded(latest)["step"] == 10


def test_one_identity_from_the_config_guards_a_resume(tmp_path: Path) -> None:
    """The launcher's identity.json (from the composed DictConfig) and the checkpoint's identity part (from the
    typed Config the trainer holds) are one dict; a checkpoint refuses a changed fixed setting in one line naming
    it with both values, and takes another world size."""
    def composed() -> DictConfig:
        cfg = compose_defaults({"data": "synthetic"})
        cfg.out_dir = str(tmp_path / "run")  # configs/ names it by the time of day (Hydra's resolver)
        return cfg

    cfg = composed()
    mine = run_identity(typed(cfg))
    assert mine == run_identity(cfg) and json.loads(json.dumps(mine)) == mine
    assert {"train.batch_size", "seed", "model.arch", "method.tau", "data.subset"} <= set(mine)
    assert not {k for k in mine if k.startswith(("gpus", "nodes", "train.epochs", "train.lr"))}
    directory = checkpoint.save(tmp_path, 4, {"identity": RunIdentity(mine), "train": TrainState(step=4)})

    elastic = composed()
    elastic.gpus, elastic.train.epochs = 3, 99
    checkpoint.load(directory, {"identity": RunIdentity(run_identity(typed(elastic)))})
    changed = composed()
    changed.method.tau, changed.train.batch_size = 0.3, 64
    with pytest.raises(ValueError) as refused:
        checkpoint.load(directory, {"identity": RunIdentity(run_identity(typed(changed)))})
    assert str(refused.value) == (
        f"checkpoint {directory} holds a run these settings cannot continue: method.tau=0.3 (run has "
        f"{cfg.method.tau}), train.batch_size=64 (run has {cfg.train.batch_size}); drop the changes to resume it, "
        "or pass a new out_dir= to start a new run")
