"""The trainer's cache of ``.beton`` files: one file per (dataset config, split), written once, found again.

The name encodes the dataset name, subset, split, size and write mode plus a hash of the whole config (minus
loader-only keys), so a changed config never reuses a stale file; an ``flock`` beside the file lets only the
first of several concurrent callers (ranks, jobs on a shared file system) write it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from invprop.data.beton import BETON_FORMAT_VERSION, FOLDER_NAMES, build_source, cfg_get, write_beton

__all__ = ["beton_cache_name", "ensure_beton"]

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
    folders), ``beton_jpeg_quality`` (90). The source files are not checked again once the beton exists.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / beton_cache_name(data_cfg, split)
    if path.is_file():
        return path
    lock_path = out_dir / f".{path.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if path.is_file():
                return path
            source = build_source(data_cfg, split)
            opts = _beton_options(data_cfg)
            write_beton(
                source,
                path,
                mode=opts["mode"],
                max_resolution=opts["max_resolution"],
                jpeg_quality=opts["jpeg_quality"],
                num_workers=num_workers,
                overwrite=False,
                progress=progress,
                description=f"beton {path.name}",
            )
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return path
