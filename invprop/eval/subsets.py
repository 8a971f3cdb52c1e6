"""Label subsets for semi-supervised fine-tuning: per-class balanced, chosen by seed, kept on disk.

A subset is a list file ``<run_dir>/subsets/labels_<pct>pct_seed<seed>.txt`` holding one training index per
line. It is written once (temporary file + ``os.replace``) and read back on every later evaluation of the
run, so a rerun or a requeued job fine-tunes on exactly the same images, and users can inspect or replace the
list. For one seed the subsets are nested: the 1% list is contained in the 10% list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from invprop.atomic import write_text_atomic
from invprop.data.seeding import derive_seed


def fraction_tag(fraction: float) -> str:
    """``0.01 -> "1pct"``, ``0.1 -> "10pct"``, ``0.005 -> "0.5pct"`` (used in file names and result keys)."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return f"{round(float(fraction) * 100, 6):g}pct"


def subset_path(run_dir: Path, fraction: float, seed: int) -> Path:
    return Path(run_dir) / "subsets" / f"labels_{fraction_tag(fraction)}_seed{int(seed)}.txt"


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted int64 indices: ``round(fraction * N / C)`` images of each of the C classes present (at least
    one; all of a class that has fewer). Each class's images are taken in an order drawn from (seed, class),
    so the choice depends only on the seed and the labels, and smaller fractions give subsets of larger."""
    fraction_tag(fraction)  # validates
    labels = labels.cpu().to(torch.int64)
    classes = torch.unique(labels)
    per_class = max(1, round(float(fraction) * labels.numel() / max(1, classes.numel())))
    chosen = []
    for c in classes.tolist():
        members = (labels == c).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(derive_seed(int(seed), 0x5B5E7, c))
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def write_subset(path: Path, indices: torch.Tensor) -> None:
    """One index per line, written whole or not at all (invprop/atomic.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(f"{int(i)}\n" for i in indices.tolist()))


def read_subset(path: Path, n: int | None = None) -> torch.Tensor:
    """Indices from a list file (blank lines and ``#`` comments ignored), checked to be unique and < n."""
    path = Path(path)
    values = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            values.append(int(text))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not an integer index: {line!r}") from None
    idx = torch.tensor(values, dtype=torch.int64)
    if idx.numel() == 0:
        raise ValueError(f"{path} lists no indices")
    if idx.min() < 0 or (n is not None and idx.max() >= n):
        raise ValueError(f"{path} has indices outside 0..{'N' if n is None else n - 1}; "
                         "was it written for a different training set (data.subset)?")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{path} lists an index twice")
    return idx


def read_named_subset(path: Path, image_paths: Sequence[str]) -> torch.Tensor:
    """Sorted indices of the training images named in a standard subset list (one file name per line, as
    ImageNet's 1percent.txt / 10percent.txt; matched to the training files by base name)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval.semisup.subset_files names {path}, which does not exist")
    row = {os.path.basename(str(p)): i for i, p in enumerate(image_paths)}
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    missing = [n for n in names if os.path.basename(n) not in row]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(names)} listed images are not in the training set "
                         f"(first: {missing[0]}); was data.subset set, or is it another data set's list?")
    if not names:
        raise ValueError(f"{path} lists no images")
    return torch.tensor(sorted({row[os.path.basename(n)] for n in names}), dtype=torch.int64)


def load_or_create_subset(run_dir: Path, labels: torch.Tensor, fraction: float, seed: int,
                          subset_files: Mapping[str, str] | None = None, tag: str | None = None,
                          images: Any = None) -> torch.Tensor:
    """The run's subset for (fraction, seed): the standard list ``subset_files[tag]`` when given (file names
    for image folders, else indices), else read from the run's list file if there, else chosen and written."""
    tag = tag or fraction_tag(fraction)
    given = (subset_files or {}).get(tag)
    if given is not None:
        if images is not None and hasattr(images, "paths"):
            return read_named_subset(Path(str(given)), list(images.paths))
        return read_subset(Path(str(given)).expanduser(), labels.numel())
    path = subset_path(run_dir, fraction, seed)
    if path.exists():
        return read_subset(path, labels.numel())
    indices = balanced_subset(labels, fraction, seed)
    write_subset(path, indices)
    return indices
