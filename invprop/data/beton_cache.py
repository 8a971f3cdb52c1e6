"""The trainer's cache of ``.beton`` files: one file per (dataset config, split), written once, found again.

The name encodes the dataset name, subset, split, size and write mode plus a hash of the whole config (minus
loader-only keys), so a changed config never reuses a stale file; an ``flock`` beside the file lets only the
first of several concurrent callers (ranks, jobs on a shared file system) write it. A record beside the file
(:mod:`invprop.data.beton_check`) ties it to its source files and its own bytes: a file whose sources were
edited, or that was damaged or truncated, is written again with one line saying why, never read.

That check stats every source file and checksums the whole file (1.28M stats for ImageNet), so a job of W ranks
runs it once: :func:`ensure_beton_world` has rank 0 check (or write) and hands the path to the others.
:data:`CHECKS` counts the work each process did.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invprop.data.beton import (
    BETON_FORMAT_VERSION,
    CIFAR_NAMES,
    FOLDER_NAMES,
    SVHN_NAMES,
    FolderSource,
    build_source,
    cfg_get,
    write_beton,
)
from invprop.data.beton_check import fingerprint, problem, record_path, write_record

if TYPE_CHECKING:
    from invprop.collectives import Comm

__all__ = ["CHECKS", "beton_cache_name", "ensure_beton", "ensure_beton_world", "source_files"]


@dataclasses.dataclass
class CheckCount:
    """What this process's :func:`ensure_beton` calls did: source files stat-ed and file checks run."""

    stats: int = 0
    checks: int = 0

    def reset(self) -> None:
        self.stats = self.checks = 0


CHECKS = CheckCount()


def _problem(path: Path, sources: str) -> str | None:
    CHECKS.checks += 1
    return problem(path, sources)

# Keys of a data config that do not change the content of the file.
# Keys that do not change what a beton holds (the evaluation split and normalisation are applied after reading).
_NON_CONTENT_KEYS = {"loader", "num_workers", "workers", "batch_size", "beton_dir", "ffcv", "cache_dir",
                     "eval_split", "mean", "std"}


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg):  # the typed DataConfig: the same tree (and cache name) as its DictConfig
        return dataclasses.asdict(cfg)
    return dict(vars(cfg))


def _beton_options(data_cfg: Any) -> dict:
    name = str(cfg_get(data_cfg, "name", "")).lower()
    folder = name in FOLDER_NAMES
    return {
        "mode": str(cfg_get(data_cfg, "beton_mode", "jpg" if folder else "raw")),
        "max_resolution": cfg_get(data_cfg, "beton_max_resolution", 256 if folder else None),
        "jpeg_quality": int(cfg_get(data_cfg, "beton_jpeg_quality", 90)),
    }


def beton_cache_name(data_cfg: Any, split: str) -> str:
    """File name of the cached beton: readable prefix plus a hash of every content-relevant config value."""
    plain = {k: v for k, v in _plain(data_cfg).items() if k not in _NON_CONTENT_KEYS}
    opts = _beton_options(data_cfg)
    key = json.dumps(
        {"cfg": plain, "split": split, "opts": opts, "v": BETON_FORMAT_VERSION}, sort_keys=True, default=str
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    parts = [str(cfg_get(data_cfg, "name", "data"))]
    subset = cfg_get(data_cfg, "subset")
    if subset not in (None, "", "none", 0, "0"):
        parts.append(str(subset))
    parts.append(split)
    size = cfg_get(data_cfg, "image_size")
    if size:
        parts.append(f"{size}px")
    parts.append(opts["mode"])
    stem = "-".join(parts).replace(os.sep, "_").replace(" ", "_")
    return f"{stem}-{digest}.beton"


def source_files(data_cfg: Any, split: str) -> list[str]:
    """The files the beton of ``data_cfg`` / ``split`` is written from, in order (none for generated data)."""
    from invprop.data.cifar import cifar_files
    from invprop.data.datasets import _folder_rows
    from invprop.data.fashion_mnist import find_files

    name = str(cfg_get(data_cfg, "name", "")).lower()
    root = cfg_get(data_cfg, "root")
    if name in ("folder", "imagenet"):
        paths, _, rows = _folder_rows(data_cfg, split)
        return [paths[i] for i in rows.tolist()]
    if name in FOLDER_NAMES:
        return [path for path, _ in FolderSource(str(root), split).samples]
    if name in CIFAR_NAMES:
        return [str(p) for p in cifar_files(str(root), split, CIFAR_NAMES[name])]
    if name in SVHN_NAMES:
        return [str(Path(str(root)).expanduser() / f"{split}_32x32.mat")]
    if name == "fashion_mnist":
        return [str(p) for p in find_files(split, None if root is None else str(root))]
    return []


def ensure_beton(
    data_cfg: Any,
    split: str,
    out_dir: str | os.PathLike,
    *,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Path of the beton for ``data_cfg`` / ``split`` in ``out_dir``, writing it first if it is not there.

    The name encodes the dataset name, subset, split, size and write mode plus a hash of the whole config
    (minus loader-only keys), so a changed config never reuses a stale file. Concurrent callers (several
    ranks, several jobs on a shared file system) serialise on an ``flock`` beside the file and only the first
    writes.
    Optional config keys: ``beton_mode`` (raw; jpg for folders), ``beton_max_resolution`` (none; 256 for
    folders), ``beton_jpeg_quality`` (90). A file there is used only when its record says it was written from
    these source files (names, sizes, modification times) and its bytes, header and index still check out;
    otherwise it is written again (temporary file, then rename) with one line on stderr saying why.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / beton_cache_name(data_cfg, split)
    files = source_files(data_cfg, split)
    CHECKS.stats += len(files)
    sources = fingerprint(files)
    if path.is_file() and _problem(path, sources) is None:
        return path
    lock_path = out_dir / f".{path.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if path.is_file():  # checked again: another caller may have rewritten it while this one waited
                why = _problem(path, sources)
                if why is None:
                    return path
                print(f"rewriting {path}: {why}", file=sys.stderr, flush=True)
            record_path(path).unlink(missing_ok=True)  # no record, no use: a write that stops is never read
            source = build_source(data_cfg, split)
            opts = _beton_options(data_cfg)
            write_beton(
                source,
                path,
                mode=opts["mode"],
                max_resolution=opts["max_resolution"],
                jpeg_quality=opts["jpeg_quality"],
                num_workers=num_workers,
                overwrite=True,
                progress=progress,
                description=f"beton {path.name}",
            )
            write_record(path, sources, len(source))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return path


def ensure_beton_world(
    data_cfg: Any,
    split: str,
    out_dir: str | os.PathLike,
    comm: Comm,
    *,
    num_workers: int | None = None,
    progress: bool = True,
    poll_s: float = 2.0,
) -> Path:
    """:func:`ensure_beton` once for the ranks of ``comm``: rank 0 checks (or writes) the file, the others get
    its path and open it without checking again. Every rank calls it.

    Rank 0 works in a thread while every rank joins a one-flag all-reduce each ``poll_s``: no collective waits
    longer than a poll, so a first write that takes hours never hits ``train.dist_timeout_s``. A rank that does
    not see rank 0's file (``beton_dir`` on a node-local disk) checks or writes its own copy. An error on rank 0
    is raised there and named on the others.
    """
    if comm.world == 1:
        return ensure_beton(data_cfg, split, out_dir, num_workers=num_workers, progress=progress)
    outcome: dict[str, Any] = {}
    worker = None
    if comm.is_main:
        def check() -> None:
            try:
                outcome["path"] = str(ensure_beton(data_cfg, split, out_dir, num_workers=num_workers,
                                                   progress=progress))
            except BaseException as exc:  # noqa: BLE001 - re-raised on this rank, named on the others
                outcome["error"] = exc

        worker = threading.Thread(target=check, name=f"ensure-beton-{split}", daemon=True)
        worker.start()
    while True:
        if worker is not None:
            worker.join(poll_s)
        if comm.host_flags_any([worker is not None and not worker.is_alive()])[0]:
            break
    error = outcome.get("error")
    answer = comm.gather_objects(
        (None if error is None else f"{type(error).__name__}: {error}", outcome.get("path")) if comm.is_main
        else None)[0]
    if error is not None:
        raise error
    failed, shared = answer
    if failed is not None:
        raise RuntimeError(f"rank 0 could not prepare the {split} .beton in {out_dir}: {failed}")
    path = Path(shared)
    if not comm.is_main and not path.is_file():  # not on this node's disk: its own check (or write)
        return ensure_beton(data_cfg, split, out_dir, num_workers=num_workers, progress=False)
    return path
