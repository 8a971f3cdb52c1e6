"""Committed checkpoint directories (docs/DESIGN.md, "The checkpoint protocol").

step_<n>/ holds rank 0's `state.pt` (model, optimiser, schedule position, RNG, data position, neighbour
table) and every rank's `bank.<r>-of-<W>`. Each file goes to a temporary name and is os.replace'd; after
a barrier rank 0 writes COMMITTED (a manifest of the files' sizes and sha256) last. Only committed, intact
directories are loaded, and a directory is written once: a save to a step that already has an intact
committed checkpoint changes nothing (the state of step n is the same whichever path saves it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from invprop import collectives as coll
from invprop.bank import shard_bounds

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


def save(root: Path, step: int, rank: int, world: int, state: dict[str, Any] | None,
         bank_rows: torch.Tensor, bank_start: int, n_rows: int, keep: int = 3,
         device: torch.device | None = None) -> Path:
    """Collective: every rank writes its bank shard, rank 0 the rest, then COMMITTED after a barrier.

    If step_<step> is already committed and intact on every rank's view, nothing is written: re-saving would
    replace files a manifest vouches for. A committed but broken one loses its marker first, then is rewritten.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the checkpoint just written must be kept")
    target = Path(root) / f"step_{step}"
    (rewrite,) = coll.host_flags_any([problem(target) is not None], device or torch.device("cpu"))
    if not rewrite:
        return target
    if rank == 0:
        (target / MARKER).unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    save_atomic({"rows": bank_rows.detach().cpu(), "start": bank_start, "n": n_rows},
                target / f"bank.{rank}-of-{world}")
    if rank == 0:
        save_atomic(state, target / "state.pt")
    coll.barrier()
    if rank == 0:
        # Exactly the files of this save: never the marker itself, nor a shard a save at another world left.
        names = ["state.pt", *(f"bank.{r}-of-{world}" for r in range(world))]
        files = {name: {"size": (target / name).stat().st_size, "sha256": _sha256(target / name)} for name in names}
        marker = target / f".{MARKER}.tmp"
        marker.write_text(json.dumps({"step": step, "world": world, "files": files}))
        os.replace(marker, target / MARKER)
        # Keep the `keep` newest committed up to this step; newer ones (broken, or the run went back) stay.
        older = [d for d in step_dirs(root) if step_of(d) < step and (d / MARKER).exists()]
        for old in older[keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    coll.barrier()
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
        path = directory / f"bank.{r}-of-{saved_world}"
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - as in load_state
            raise CorruptCheckpoint(f"{path} cannot be loaded as a bank shard ({type(exc).__name__})") from exc
        if shard["n"] != n:
            raise ValueError(f"checkpoint {directory} has a bank of {shard['n']} rows, this run has {n}")
        lo, hi = max(start, s_start), min(stop, s_stop)
        parts.append(shard["rows"][lo - s_start : hi - s_start])
    rows = torch.cat(parts)
    if rows.shape[0] != stop - start:
        raise ValueError(f"checkpoint {directory} is missing bank rows {start}..{stop}")
    return rows
