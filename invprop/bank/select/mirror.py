"""A float16 copy of the bank rows kept current through the bank's update hook (for the low-precision
selections: `filter` and `triton`)."""

from __future__ import annotations

import torch

DTYPE = torch.float16


class HalfMirror:
    """Mixin: the mirror, the largest row norm (for the rounding bound), and the rows' version they match."""

    @property
    def mirror(self) -> torch.Tensor | None:
        """The float16 copy of the rows, or None while there is none."""
        return self._half

    def forget_rows(self) -> None:
        self._half: torch.Tensor | None = None
        self._half_key: int | None = None  # the rows' version the mirror matches
        self._half_max_norm = torch.zeros(())

    def rows_written(self, rows: torch.Tensor, version_before: int, index: torch.Tensor, new: torch.Tensor) -> None:
        """Keep a current mirror current instead of rebuilding it."""
        if self._half is None or self._half_key != version_before:
            return
        self._half.index_put_((index,), new.to(DTYPE))
        self._half_max_norm = torch.maximum(self._half_max_norm, new.norm(dim=1).max())
        self._half_key = rows._version

    def half_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float16 mirror of the rows and the largest row norm (a 0-d tensor); rebuilt when the rows were
        replaced (the bank calls `forget_rows`) or written in place anywhere but the bank's update, which keeps
        both current (the rows' version counter tells)."""
        if self._half is None or self._half_key != rows._version:
            self._half = rows.to(DTYPE)
            norms = rows.norm(dim=1)
            self._half_max_norm = norms.max() if norms.numel() else norms.new_zeros(())
            self._half_key = rows._version
        return self._half, self._half_max_norm
