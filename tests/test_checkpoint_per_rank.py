"""Checkpoint I/O per rank in proportion to what it owns (issue 27, item 2), over W gloo ranks: a same-world
resume reads each rank's own shard and state.pt once, an elastic one only the overlapping saved shards, and a
shard broken on one rank makes every rank fall back to the same older checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_checkpoint import Box  # the replicated part the single-process checkpoint tests use

from invprop import checkpoint, distributed
from invprop.bank import ShardedBank, shard_bounds
from invprop.jobs.spawn import spawn_ranks

pytestmark = pytest.mark.timeout(180)

N, D = 1003, 8



def _rows(step: int) -> torch.Tensor:
    return torch.arange(N * D, dtype=torch.float32).view(N, D) + 1000 * step


def _save(rank: int, world: int, root: str) -> None:
    comm = distributed.init(distributed.read_env(), timeout_s=60)
    for step in (1, 2):
        bank = ShardedBank(N, D, comm=comm)
        bank.load_state_dict({"rows": _rows(step)[bank.start:bank.stop], "start": bank.start, "n": N})
        checkpoint.save(Path(root), step, {"box": Box(step=step, w=torch.ones(50_000)), "bank": bank}, comm=comm)
    distributed.shutdown()


def _resume(rank: int, world: int, root: str, out: str) -> None:
    comm = distributed.init(distributed.read_env(), timeout_s=60)
    bank, box = ShardedBank(N, D, comm=comm), Box()
    before = checkpoint.IO.bytes_read
    found = checkpoint.latest(Path(root), report=rank == 0, states={"box": box, "bank": bank}, comm=comm)
    checkpoint.load(found, {"box": box, "bank": bank})
    torch.save({"step": found.name, "bytes": checkpoint.IO.bytes_read - before, "rows": bank.rows,
                "start": bank.start, "box": box.values["step"]}, os.path.join(out, f"{rank}.pt"))
    distributed.shutdown()


def _run_resume(root: Path, world: int, out: Path) -> list[dict]:
    out.mkdir(exist_ok=True)
    spawn_ranks(_resume, world, (str(root), str(out)), timeout_s=120)
    return [torch.load(out / f"{r}.pt") for r in range(world)]


def _sizes(directory: Path) -> dict[str, int]:
    return {name: e["size"] for name, e in json.loads((directory / "COMMITTED").read_text())["files"].items()}


@pytest.mark.slow  # ~25 s of forked ranks (CI's slow set)
def test_each_rank_reads_its_own_files_and_all_agree_on_a_fallback(tmp_path: Path) -> None:
    spawn_ranks(_save, 4, (str(tmp_path / "ckpt"),), timeout_s=120)
    newest = tmp_path / "ckpt" / "step_2"
    sizes = _sizes(newest)
    manifest = json.loads((newest / "COMMITTED").read_text())
    assert [manifest["files"][f"bank.{r}-of-4"]["rows"] for r in range(4)] == \
        [list(shard_bounds(N, r, 4)) for r in range(4)]

    # same world: state.pt + this rank's shard, read once (verified bytes are what is loaded)
    same = _run_resume(tmp_path / "ckpt", 4, tmp_path / "w4")
    for r, got in enumerate(same):
        assert got["step"] == "step_2" and got["box"] == 2
        assert got["bytes"] == sizes["state.pt"] + sizes[f"bank.{r}-of-4"]
        assert torch.equal(got["rows"], _rows(2)[got["start"]:got["start"] + got["rows"].shape[0]])

    # elastic, W = 4 -> 3: only the saved shards that overlap the new rows
    for r, got in enumerate(_run_resume(tmp_path / "ckpt", 3, tmp_path / "w3")):
        lo, hi = shard_bounds(N, r, 3)
        overlapping = [s for s in range(4) if shard_bounds(N, s, 4)[0] < hi and lo < shard_bounds(N, s, 4)[1]]
        assert len(overlapping) < 4
        assert got["bytes"] == sizes["state.pt"] + sum(sizes[f"bank.{s}-of-4"] for s in overlapping)
        assert torch.equal(got["rows"], _rows(2)[lo:hi])

    # one rank's shard broken: every rank falls back to step_1 (no rank resumes from step_2)
    broken = newest / "bank.2-of-4"
    broken.write_bytes(broken.read_bytes()[:-7] + b"garbage")
    for got in _run_resume(tmp_path / "ckpt", 4, tmp_path / "fallback"):
        assert got["step"] == "step_1" and got["box"] == 1
        assert torch.equal(got["rows"], _rows(1)[got["start"]:got["start"] + got["rows"].shape[0]])
