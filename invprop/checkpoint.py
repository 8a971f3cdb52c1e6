"""Committed checkpoint directories (docs/DESIGN.md, "The checkpoint protocol").

A checkpoint is a dict of named parts, each an `invprop.state.Stateful` that owns its state. step_<n>/ holds
rank 0's `state.pt` (the replicated parts: model, optimiser, train and data positions, RNG, neighbour table)
and every rank's `<part>.<r>-of-<W>` of each sharded part (the bank). Each file goes to a temporary name and is
os.replace'd; after a barrier rank 0 writes COMMITTED (a manifest of the files' sizes and sha256) last. Only
committed, intact directories are loaded, and a directory is written once: a save to a step that already has an
intact committed checkpoint changes nothing (the state of step n is the same whichever path saves it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from invprop.collectives import Comm
from invprop.state import ShardedStateful, Stateful

MARKER = "COMMITTED"


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read back as what was saved."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then os.replace; a failed write leaves nothing."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def step_dirs(root: Path) -> list[Path]:
    """step_<n> directories, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def step_of(directory: Path) -> int:
    return int(Path(directory).name[5:])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sharded(states: Mapping[str, Stateful]) -> list[str]:
    return [name for name, part in states.items() if isinstance(part, ShardedStateful)]


# state.pt keeps the layout it had before the parts owned their state, so checkpoints written before still load
# and tools that read state.pt["model"] keep working: a part is stored under its own name, except these four,
# which had their own entries.
def _to_file(parts: dict[str, Any]) -> dict[str, Any]:
    out = dict(parts)
    if "train" in out or "data" in out:  # one entry {epoch, batch, step}
        out["train_state"] = {**out.pop("data", {}), **out.pop("train", {})}
        out.setdefault("graph", None)  # a method without a neighbour graph saved None
    if "graph" in out and out["graph"] is not None:
        out["graph"] = out["graph"]["table"]  # the bare table
    if "rng" in out:
        out["rng_torch"] = out.pop("rng")["torch"]
    return out


def _from_file(saved: dict[str, Any]) -> dict[str, Any]:
    parts = dict(saved)
    if "train_state" in parts:
        position = parts.pop("train_state")
        parts["train"] = {"step": position["step"]}
        parts["data"] = {"epoch": position["epoch"], "batch": position["batch"]}
    if "graph" in parts:
        table = parts.pop("graph")
        if table is not None:
            parts["graph"] = {"table": table}
    if "rng_torch" in parts:
        parts["rng"] = {"torch": parts.pop("rng_torch")}
    return parts


def save(root: Path, step: int, states: Mapping[str, Stateful], *, comm: Comm | None = None,
         keep: int = 3) -> Path:
    """Collective over `comm` (default: one process): every rank writes its shard of each sharded part, rank 0
    the replicated parts to state.pt, then COMMITTED after a barrier. Returns step_<step>.

    If step_<step> is already committed and intact on every rank's view, nothing is written: re-saving would
    replace files a manifest vouches for. A committed but broken one loses its marker first, then is rewritten.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the checkpoint just written must be kept")
    comm = comm or Comm()
    rank, world = comm.rank, comm.world
    target = Path(root) / f"step_{step}"
    (rewrite,) = comm.host_flags_any([problem(target) is not None])
    if not rewrite:
        return target
    if rank == 0:
        (target / MARKER).unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    sharded = _sharded(states)
    for name in sharded:
        save_atomic(states[name].state_dict(), target / f"{name}.{rank}-of-{world}")
    if rank == 0:  # the replicated parts are the same on every rank: one copy
        save_atomic(_to_file({name: part.state_dict() for name, part in states.items() if name not in sharded}),
                    target / "state.pt")
    comm.barrier()
    if rank == 0:
        # Exactly the files of this save: never the marker itself, nor a shard a save at another world left.
        names = ["state.pt", *(f"{name}.{r}-of-{world}" for name in sharded for r in range(world))]
        files = {name: {"size": (target / name).stat().st_size, "sha256": _sha256(target / name)} for name in names}
        marker = target / f".{MARKER}.tmp"
        marker.write_text(json.dumps({"step": step, "world": world, "files": files}))
        os.replace(marker, target / MARKER)
        # Keep the `keep` newest committed up to this step; newer ones (broken, or the run went back) stay.
        older = [d for d in step_dirs(root) if step_of(d) < step and (d / MARKER).exists()]
        for old in older[keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return target


def _manifest_files(directory: Path) -> dict[str, dict[str, Any]]:
    manifest = json.loads((directory / MARKER).read_text())
    files = manifest["files"]
    # Manifests written before sha256 was recorded map a name to its size.
    return {name: entry if isinstance(entry, dict) else {"size": entry} for name, entry in files.items()
            if name != MARKER}


def problem(directory: Path) -> str | None:
    """None when `directory` is a committed checkpoint whose every file is the one saved and loads as data
    (weights_only, so a pickle that would run code counts as corrupt); else what is wrong, naming the file."""
    directory = Path(directory)
    if not (directory / MARKER).exists():
        return "no COMMITTED marker"
    try:
        files = _manifest_files(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable {directory / MARKER} ({exc})"
    if "state.pt" not in files:
        return f"{directory / MARKER} does not list state.pt"
    for name, entry in sorted(files.items()):
        path = directory / name
        try:
            if path.stat().st_size != entry["size"]:
                return f"{path} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
            if "sha256" in entry and _sha256(path) != entry["sha256"]:
                return f"{path} does not match its sha256 in the manifest"
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read the file back makes it unusable
            return f"{path} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def warn(message: str) -> None:
    """One line on stderr (warnings.warn would add a second line quoting our source)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest(root: Path, report: bool = True) -> Path | None:
    """Newest committed, intact checkpoint; each newer broken one is skipped with one warning line naming
    the file (uncommitted directories are saves that never finished, skipped silently)."""
    for directory in step_dirs(root):
        if not (directory / MARKER).exists():
            continue
        found = problem(directory)
        if found is None:
            return directory
        if report:
            warn(f"skipping corrupt checkpoint {directory}: {found}; using an older one")
    return None


def load_state(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / "state.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - garbage or a pickle that is not plain data
        raise CorruptCheckpoint(f"{path} cannot be loaded as a checkpoint ({type(exc).__name__})") from exc


def load(directory: Path, states: Mapping[str, Stateful]) -> None:
    """Put the committed checkpoint `directory` back into `states`, in their order (so a part that only checks,
    like the run's identity, can come first). Parts the checkpoint holds but `states` does not name are left
    alone; a sharded part gets every shard of the world that saved it (memory-mapped: only what it reads is
    read), so a run may resume at another world size. A part that does not fit raises ValueError naming the
    checkpoint."""
    directory = Path(directory)
    sharded = _sharded(states)
    saved = _from_file(load_state(directory)) if len(sharded) < len(states) else {}
    saved_world = json.loads((directory / MARKER).read_text())["world"] if sharded else 0
    for name, part in states.items():
        try:
            if name in sharded:
                part.load_shards([_load_shard(directory / f"{name}.{r}-of-{saved_world}", name)
                                  for r in range(saved_world)])
            elif name in saved:
                part.load_state_dict(saved[name])
            else:
                raise ValueError(f"has no {name!r} (it holds {', '.join(sorted(saved))})")
        except CorruptCheckpoint:
            raise
        except ValueError as exc:  # a part that does not fit this run says how; name the checkpoint
            raise ValueError(f"checkpoint {directory} {exc}") from exc


def _load_shard(path: Path, name: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - as in load_state
        raise CorruptCheckpoint(f"{path} cannot be loaded as a {name} shard ({type(exc).__name__})") from exc
