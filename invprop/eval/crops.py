"""Training crops of the trained evaluations (the online linear probe, semisup's fine-tune) read through FFCV.

Under ``data.format=ffcv`` on an image folder each rank reads its slice of every global batch of the
evaluation's :class:`~invprop.data.order.EpochOrder` (the slice :func:`invprop.eval.world.run_epochs` hands
its step) from the split's .beton through FFCV's seeded RandomResizedCrop loader
(:class:`~invprop.data.ffcv.loader.FFCVTrainLoader`): decoded and cropped by FFCV's worker threads, not by PIL
on the rank's main thread. A sample's box and flip come from ``(seed, epoch, file row)``
(:mod:`invprop.data.crop`), so a resumed evaluation, or another world size, crops each image as the
uninterrupted one did. The crops differ from the PIL path's (another random stream, FFCV's resize): a run's
``eval_<protocol>_loader`` says which ran. :meth:`invprop.eval.readers.EvalReader.crops` builds one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from invprop.data.order import EpochOrder

__all__ = ["FFCVCrops", "RowsOrder"]


class RowsOrder(EpochOrder):
    """``order``'s global batches as rows of a file of ``file_rows`` rows: position p of ``order`` reads row
    ``rows[p]`` (the probe's training rows, semisup's label subset)."""

    def __init__(self, order: EpochOrder, rows: torch.Tensor, file_rows: int) -> None:
        rows = rows.to(torch.int64).cpu()
        if rows.numel() != order.n:
            raise ValueError(f"{rows.numel()} rows for an order over {order.n} positions")
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < file_rows):
            raise ValueError(f"rows outside the file's {file_rows} rows")
        super().__init__(order.n, order.global_batch, order.seed)
        self.order, self.rows = order, rows
        self.n = int(file_rows)  # what FFCVTrainLoader checks against the .beton

    @property
    def num_batches(self) -> int:
        return self.order.num_batches

    def global_batch_indices(self, epoch: int, b: int) -> torch.LongTensor:
        return self.rows[self.order.global_batch_indices(epoch, b)]


class FFCVCrops:
    """Seeded random resized crops (uint8 ``(B, 3, S, S)``) of this rank's slice of each global batch, from a
    .beton; call it with the step's ``(epoch, batch, file rows)`` in run order. A call that does not follow the
    previous one (the first, a resumed position) starts FFCV's pass there; rows other than the order's raise."""

    name = "ffcv"

    def __init__(self, beton: Path, order: EpochOrder, rows: torch.Tensor, file_rows: int, rank: int, world: int,
                 workers: int, image_size: int, seed: int, scale: tuple[float, float], flip: bool) -> None:
        from invprop.data.ffcv.loader import FFCVTrainLoader

        self.order = RowsOrder(order, rows, file_rows)
        self.loader = FFCVTrainLoader(beton, self.order, rank, world, max(1, workers), image_size, seed,
                                      scale=tuple(scale), flip=flip)
        self._pass = None

    def __call__(self, epoch: int, b: int, rows: torch.Tensor) -> torch.Tensor:
        if self._pass is None or self._pass.epoch != epoch or self._pass.next_batch != b:
            self._pass = self.loader.epoch(epoch, b)
        images, _, indices = next(self._pass)
        # the step's rows and FFCV's must be the same images, or crops and labels part
        if not torch.equal(indices, rows.cpu().to(torch.int64)):
            raise ValueError(f"FFCV read rows {indices[:4].tolist()}.. at epoch {epoch} batch {b}, the step has "
                             f"{rows[:4].tolist()}..")
        return images

    def close(self) -> None:
        self.loader.close()
