"""Committed checkpoint directories (docs/DESIGN.md, "The checkpoint protocol").

step_<n>/ holds rank 0's `state.pt` (model, optimiser, schedule position, RNG, data position, neighbour
table) and every rank's `bank.<r>-of-<W>`. Each file goes to a temporary name and is os.replace'd; after
a barrier rank 0 writes COMMITTED (a manifest of file sizes) last. Only committed directories are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from invprop import collectives as coll
from invprop.bank import shard_bounds

MARKER = "COMMITTED"


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def step_dirs(root: Path) -> list[Path]:
    """step_<n> directories, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save(root: Path, step: int, rank: int, world: int, state: dict[str, Any] | None,
         bank_rows: torch.Tensor, bank_start: int, n_rows: int, keep: int = 3) -> Path:
    """Collective: every rank writes its bank shard, rank 0 the rest, then COMMITTED after a barrier."""
    target = Path(root) / f"step_{step}"
    target.mkdir(parents=True, exist_ok=True)
    save_atomic({"rows": bank_rows.detach().cpu(), "start": bank_start, "n": n_rows},
                 target / f"bank.{rank}-of-{world}")
    if rank == 0:
        save_atomic(state, target / "state.pt")
    coll.barrier()
    if rank == 0:
        # not COMMITTED itself: a second save of the same step (periodic, then final) rewrites it
        sizes = {p.name: p.stat().st_size for p in target.iterdir() if not p.name.startswith(".") and p.name != MARKER}
        marker = target / f".{MARKER}.tmp"
        marker.write_text(json.dumps({"step": step, "world": world, "files": sizes}))
        os.replace(marker, target / MARKER)
        for old in [d for d in step_dirs(root) if (d / MARKER).exists()][keep:]:
            shutil.rmtree(old, ignore_errors=True)
    coll.barrier()
    return target


def _intact(directory: Path) -> bool:
    """COMMITTED exists and every file it lists is there with its recorded size."""
    marker = directory / MARKER
    if not marker.exists():
        return False
    try:
        manifest = json.loads(marker.read_text())
        return all((directory / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest(root: Path) -> Path | None:
    """Newest committed, intact checkpoint; newer broken ones are skipped with a warning."""
    for directory in step_dirs(root):
        if not (directory / MARKER).exists():
            continue  # a save that never finished: not a checkpoint
        if _intact(directory):
            return directory
        warnings.warn(f"skipping corrupt checkpoint {directory} (files do not match its COMMITTED manifest)",
                      stacklevel=2)
    return None


def load_state(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / "state.pt", map_location=map_location, weights_only=True)


def load_bank_shard(directory: Path, n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows [start, stop) for world size `world`, resharded from whatever world saved them."""
    directory = Path(directory)
    saved_world = json.loads((directory / MARKER).read_text())["world"]
    start, stop = shard_bounds(n, rank, world)
    parts = []
    for r in range(saved_world):
        s_start, s_stop = shard_bounds(n, r, saved_world)
        if s_stop <= start or s_start >= stop:
            continue
        shard = torch.load(directory / f"bank.{r}-of-{saved_world}", map_location="cpu", weights_only=True)
        if shard["n"] != n:
            raise ValueError(f"checkpoint {directory} has a bank of {shard['n']} rows, this run has {n}")
        lo, hi = max(start, s_start), min(stop, s_stop)
        parts.append(shard["rows"][lo - s_start : hi - s_start])
    rows = torch.cat(parts)
    if rows.shape[0] != stop - start:
        raise ValueError(f"checkpoint {directory} is missing bank rows {start}..{stop}")
    return rows
