"""Where the evaluation feature passes read a split's pixels (test transform: the centred square, resized).

With ``data.format=ffcv`` and an image folder, each rank reads its rows of the split's .beton (one per split,
:func:`invprop.data.beton_cache.ensure_beton_world`: checked or written once per job) through FFCV's
centre-crop loader, about seven times PIL's decode rate (docs/results/eval_loader.json), and the online
probe's and semisup's training crops come from its seeded RandomResizedCrop loader (:meth:`EvalReader.crops`).
Otherwise, or where FFCV does not import, the folder's files go through PIL (:func:`invprop.data.eval_batches`,
:func:`invprop.eval.linear.crop_batch`), and images in memory are sliced. :attr:`EvalReader.name` says which
ran (ffcv | pil | memory); results record it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from invprop.collectives import Comm
from invprop.config.data_schema import DataFormat
from invprop.data import is_lazy
from invprop.data.order import EpochOrder
from invprop.data.sources import ffcv_available

if TYPE_CHECKING:
    from invprop.eval.crops import FFCVCrops

__all__ = ["BetonRows", "EvalReader"]

# The betons this process has had checked, by (beton_dir, file name): training's kNN curves build a reader each
# time they run, and one check per split per job is enough (training's own loader opens its file once too).
_CHECKED: dict[tuple[str, str], Path] = {}


class BetonRows:
    """Rows ``[start, stop)`` of a split's .beton, as evaluation sees them; :func:`invprop.data.eval_batches`
    streams them through one FFCV centre-crop loader per pass."""

    def __init__(self, path: Path, start: int, stop: int, image_size: int, crop_ratio: float, workers: int) -> None:
        self.path, self.start, self.stop = path, int(start), int(stop)
        self.image_size, self.crop_ratio, self.workers = int(image_size), float(crop_ratio), int(workers)

    def __len__(self) -> int:
        return self.stop - self.start

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        if len(self) == 0:
            return
        from invprop.data.ffcv.loader import FFCVEvalLoader

        loader = FFCVEvalLoader(self.path, batch_size, max(1, self.workers), self.image_size,
                                rows=(self.start, self.stop), center_crop_ratio=self.crop_ratio)
        expected = self.start
        try:
            for images, _, indices in loader:
                # the beton's rows must be the split's rows in load_split's order, or features and labels part
                if not torch.equal(indices, torch.arange(expected, expected + len(indices))):
                    raise ValueError(f"{self.path} rows {expected}.. are not in the split's order")
                expected += len(indices)
                yield images
        finally:
            loader.close()


class EvalReader:
    """How this evaluation reads pixels for its feature passes; built once (:meth:`for_config`) and called
    by every rank at the same points (the first call for a split checks its .beton once for the job)."""

    def __init__(self, data_cfg: Any, comm: Comm, name: str) -> None:
        self.data_cfg, self.comm, self.name = data_cfg, comm, name

    @classmethod
    def for_config(cls, data_cfg: Any, comm: Comm, lazy: bool = True) -> EvalReader:
        """FFCV for image folders under data.format=ffcv when FFCV imports; else PIL (folders) or memory."""
        if not lazy:
            return cls(data_cfg, comm, "memory")
        if data_cfg.format != DataFormat.ffcv:
            return cls(data_cfg, comm, "pil")
        if not ffcv_available(say=False):
            if comm.is_main:
                print("data.format=ffcv but FFCV is not installed: evaluation features read the image files "
                      "through PIL", file=sys.stderr, flush=True)
            return cls(data_cfg, comm, "pil")
        return cls(data_cfg, comm, "ffcv")

    def rows(self, images: Any, split: str, lo: int, hi: int) -> Any:
        """Rows ``lo:hi`` of ``split`` (``images``: its load_split images) for :func:`invprop.data.eval_batches`."""
        if self.name != "ffcv" or not is_lazy(images):
            return images[lo:hi]
        return BetonRows(self._beton(split), lo, hi, images.image_size, images.eval_crop_ratio, images.eval_workers)

    def crops(self, images: Any, split: str, order: EpochOrder, rows: torch.Tensor, seed: int,
              scale: tuple[float, float], flip: bool) -> FFCVCrops | None:
        """The FFCV reader of a trained evaluation's training crops (:mod:`invprop.eval.crops`: position p of
        `order` is row ``rows[p]`` of ``split``, crops keyed by `seed`), or None where they go through PIL or
        come from memory (:func:`invprop.eval.linear.crop_batch`). Every rank calls it at the same point."""
        if self.name != "ffcv" or not is_lazy(images):
            return None
        from invprop.eval.crops import FFCVCrops

        return FFCVCrops(self._beton(split), order, rows, len(images), self.comm.rank, self.comm.world,
                         images.eval_workers, images.image_size, seed, scale, flip)

    def _beton(self, split: str) -> Path:
        """The split's .beton, checked (or written) once per job."""
        from invprop.data.beton_cache import beton_cache_name, ensure_beton_world

        key = (str(self.data_cfg.beton_dir), beton_cache_name(self.data_cfg, split))
        if key not in _CHECKED:  # the same on every rank: they all call rows() / crops() at the same points
            _CHECKED[key] = ensure_beton_world(self.data_cfg, split, Path(self.data_cfg.beton_dir), self.comm,
                                               progress=self.comm.is_main)
        return _CHECKED[key]
