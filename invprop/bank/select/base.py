"""The interface every local top-M selection implements, and the pieces the strategies share."""

from __future__ import annotations

import torch

# (values, global ids, ids ascending along each row)
Selected = tuple[torch.Tensor, torch.Tensor, bool]


class Selection:
    """One way of finding, per query, a superset of this rank's local top-m scores against `rows` (the shard,
    n_local x D, whose first row has global id `start`): values and global ids, padded with -inf / -1. Every
    strategy is exact; they differ in speed only (docs/DESIGN.md, "Selection strategies").

    A strategy that derives state from the rows (the filter's float16 mirror) keeps it current through the
    hooks the bank calls: `forget_rows` when the rows were replaced (or `auto` did not choose the strategy),
    `rows_written` after the bank's own momentum update.
    """

    name = ""
    retune_requested = False  # the strategy has become slow for these rows: `auto` should measure again

    def select(self, zq: torch.Tensor, rows: torch.Tensor, start: int, m: int) -> Selected:
        raise NotImplementedError

    def forget_rows(self) -> None:
        """Drop whatever was derived from the rows."""

    def rows_written(self, rows: torch.Tensor, version_before: int, index: torch.Tensor, new: torch.Tensor) -> None:
        """`rows[index] = new` was just written in place; `version_before` is the rows' version before it."""


def local_dots(rows: torch.Tensor, z: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """z_q . rows[local[q, c]] (Q x C) for local row indices, by gathering only those rows."""
    picked = rows.index_select(0, local.reshape(-1)).view(*local.shape, rows.shape[1])
    return torch.bmm(picked, z.unsqueeze(2)).squeeze(2)


def replace_rows(vals: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, new_vals: torch.Tensor,
                 new_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vals/cols with the given rows replaced, both padded to a common width."""
    width = max(vals.shape[1], new_vals.shape[1])

    def widen(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    vals, cols = widen(vals, float("-inf")), widen(cols, -1)
    vals[rows], cols[rows] = widen(new_vals, float("-inf")), widen(new_cols, -1)
    return vals, cols


class float32_matmul:
    """float32 GEMMs as float32 (no TF32) whatever the caller enabled: the selection is exact in float32."""

    def __enter__(self) -> None:
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.before
