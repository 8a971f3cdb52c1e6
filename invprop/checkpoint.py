"""Committed checkpoint directories (docs/DESIGN.md, "The checkpoint protocol").

A checkpoint is a dict of named parts, each an `invprop.state.Stateful` that owns its state. step_<n>/ holds
rank 0's `state.pt` (the replicated parts, each under its own name: model, optimiser, train and data positions,
RNG, neighbour table) and every rank's `<part>.<r>-of-<W>` of each sharded part (the bank). Each file goes to a
temporary name and is os.replace'd; each rank hashes what it wrote (from the bytes in memory, in parallel with
the others) and rank 0 writes COMMITTED (a manifest of every file's size, sha256 and, for a shard, its rows)
last, from what the ranks report. Only committed, intact directories are loaded, and a directory is written once:
a save to a step that already has an intact committed checkpoint changes nothing (the state of step n is the same
whichever path saves it).

I/O per rank is what the rank owns (docs/SCALING.md): on resume each rank reads and verifies only state.pt and
the saved shards that overlap its own rows, once (the verified bytes are what it loads), and the ranks agree on
the checkpoint with one collective. `IO.bytes_read` counts what this process read.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from invprop.atomic import write_bytes_atomic, write_text_atomic
from invprop.collectives import Comm
from invprop.state import ShardedStateful, Stateful

MARKER = "COMMITTED"


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read back as what was saved."""


@dataclass
class ReadCounter:
    """Bytes this process read from checkpoint files (what a resume costs the shared filesystem), and the
    verified contents waiting to be loaded, so a file is read once however often it is checked and used."""

    bytes_read: int = 0
    verified: dict[Path, bytes] = field(default_factory=dict)

    def read(self, path: Path) -> bytes:
        data = Path(path).read_bytes()
        self.bytes_read += len(data)
        return data


IO = ReadCounter()


def save_atomic(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save to a temporary name in the same folder, then os.replace; a failed write leaves nothing.
    Returns the manifest entry (size, sha256) hashed from the bytes written, without reading them back."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def step_dirs(root: Path) -> list[Path]:
    """step_<n> directories, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def step_of(directory: Path) -> int:
    return int(Path(directory).name[5:])


def _sharded(states: Mapping[str, Stateful]) -> list[str]:
    return [name for name, part in states.items() if isinstance(part, ShardedStateful)]


def save(root: Path, step: int, states: Mapping[str, Stateful], *, comm: Comm | None = None,
         keep: int = 3) -> Path:
    """Collective over `comm` (default: one process): every rank writes and hashes its shard of each sharded
    part, rank 0 the replicated parts to state.pt, then rank 0 writes COMMITTED from the entries the ranks
    report. Returns step_<step>.

    If step_<step> is already committed and intact in every rank's own files, nothing is written: re-saving would
    replace files a manifest vouches for. A committed but broken one loses its marker first, then is rewritten.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the checkpoint just written must be kept")
    comm = comm or Comm()
    rank, world = comm.rank, comm.world
    target = Path(root) / f"step_{step}"
    sharded = _sharded(states)
    own = [f"{name}.{rank}-of-{world}" for name in sharded] + (["state.pt"] if rank == 0 else [])
    (rewrite,) = comm.host_flags_any([problem(target, only=own, keep_bytes=False) is not None])
    if not rewrite:
        return target
    if rank == 0:
        (target / MARKER).unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for name in sharded:
        part = states[name]
        file = f"{name}.{rank}-of-{world}"
        entries[file] = save_atomic(part.state_dict(), target / file)
        if hasattr(part, "row_range"):
            entries[file]["rows"] = list(part.row_range())
    if rank == 0:  # the replicated parts are the same on every rank: one copy
        entries["state.pt"] = save_atomic(
            {name: part.state_dict() for name, part in states.items() if name not in sharded}, target / "state.pt")
    reported = comm.gather_objects(entries)  # also the barrier: every rank's files are on disk
    if rank == 0:
        files = {name: entry for part in reported for name, entry in part.items()}
        write_text_atomic(target / MARKER, json.dumps({"step": step, "world": world, "files": files}))
        # Keep the `keep` newest committed up to this step; newer ones (broken, or the run went back) stay.
        older = [d for d in step_dirs(root) if step_of(d) < step and (d / MARKER).exists()]
        for old in older[keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return target


def _manifest_files(directory: Path) -> dict[str, dict[str, Any]]:
    manifest = json.loads((directory / MARKER).read_text())
    files = {name: entry for name, entry in manifest["files"].items() if name != MARKER}
    if not all(isinstance(entry, dict) and "sha256" in entry for entry in files.values()):
        raise ValueError("an entry has no sha256")
    return files


def problem(directory: Path, only: list[str] | None = None, keep_bytes: bool = True) -> str | None:
    """None when `directory` is a committed checkpoint whose files (all, or those named in `only`) are the ones
    saved and load as data (weights_only, so a pickle that would run code counts as corrupt); else what is
    wrong, naming the file. Each file is read once; with `keep_bytes` its verified bytes wait for `load`."""
    directory = Path(directory)
    if not (directory / MARKER).exists():
        return "no COMMITTED marker"
    try:
        files = _manifest_files(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable {directory / MARKER} ({exc})"
    if "state.pt" not in files:
        return f"{directory / MARKER} does not list state.pt"
    for name in sorted(files if only is None else only):
        path = directory / name
        entry = files.get(name)
        if entry is None:
            return f"{directory / MARKER} does not list {name}"
        try:
            data = IO.read(path)
            if len(data) != entry["size"]:
                return f"{path} has {len(data)} bytes, the manifest says {entry['size']}"
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return f"{path} does not match its sha256 in the manifest"
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read the file back makes it unusable
            return f"{path} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if keep_bytes:
            IO.verified[path.resolve()] = data
    return None


def needed_files(directory: Path, states: Mapping[str, Stateful]) -> list[str]:
    """The files of `directory` that loading `states` on this rank reads: state.pt when a replicated part is
    asked for, and of each sharded part the saved shards that overlap this rank's rows (all of them for a part
    that does not say which rows it owns, or a manifest that does not record them)."""
    files = _manifest_files(directory)
    sharded = _sharded(states)
    names = ["state.pt"] if len(sharded) < len(states) else []
    for name in sharded:
        wanted = states[name].row_range() if hasattr(states[name], "row_range") else None
        for file, entry in sorted(files.items()):
            if not file.startswith(f"{name}.") or "-of-" not in file:
                continue
            rows = entry.get("rows")
            if wanted is None or rows is None or (rows[0] < wanted[1] and wanted[0] < rows[1]):
                names.append(file)
    return names


def warn(message: str) -> None:
    """One line on stderr (warnings.warn would add a second line quoting our source)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest(root: Path, report: bool = True, *, states: Mapping[str, Stateful] | None = None,
           comm: Comm | None = None) -> Path | None:
    """Newest committed, intact checkpoint; each newer broken one is skipped with one warning line naming
    the file (uncommitted directories are saves that never finished, skipped silently).

    With `states` only the files loading them on this rank needs are verified (`needed_files`), and with `comm`
    the call is collective: a checkpoint is taken only when every rank found its own files intact (one
    all_reduce of a flag per candidate), so the ranks never resume from different steps."""
    comm = comm or Comm()
    IO.verified.clear()
    for directory in step_dirs(root):
        if not (directory / MARKER).exists():
            continue
        try:
            only = None if states is None else needed_files(directory, states)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            found: str | None = f"unreadable {directory / MARKER} ({exc})"
        else:
            found = problem(directory, only=only, keep_bytes=states is not None)  # kept: what load will read
        (bad,) = comm.host_flags_any([found is not None])
        if not bad:
            return directory
        IO.verified.clear()
        messages = [m for m in comm.gather_objects(found) if m is not None]
        if report:
            warn(f"skipping corrupt checkpoint {directory}: {messages[0]}; using an older one")
    return None


def _read_verified(path: Path) -> io.BytesIO:
    """The bytes `latest` verified for `path` (handed over once), else the file read now."""
    data = IO.verified.pop(Path(path).resolve(), None)
    return io.BytesIO(IO.read(path) if data is None else data)


def load_state(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / "state.pt"
    try:
        return torch.load(_read_verified(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - garbage or a pickle that is not plain data
        raise CorruptCheckpoint(f"{path} cannot be loaded as a checkpoint ({type(exc).__name__})") from exc


def load(directory: Path, states: Mapping[str, Stateful]) -> None:
    """Put the committed checkpoint `directory` back into `states`, in their order (so a part that only checks,
    like the run's identity, can come first). Parts the checkpoint holds but `states` does not name are left
    alone; a sharded part gets the saved shards that overlap its rows (`needed_files`), from whatever world
    size saved them, so a run may resume at another world size. A part that does not fit raises ValueError
    naming the checkpoint."""
    directory = Path(directory)
    sharded = _sharded(states)
    saved = load_state(directory) if len(sharded) < len(states) else {}
    needed = needed_files(directory, {name: states[name] for name in sharded}) if sharded else []
    for name, part in states.items():
        try:
            if name in sharded:
                part.load_shards([_load_shard(directory / file, name) for file in needed
                                  if file.startswith(f"{name}.")])
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
        return torch.load(_read_verified(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - as in load_state
        raise CorruptCheckpoint(f"{path} cannot be loaded as a {name} shard ({type(exc).__name__})") from exc
