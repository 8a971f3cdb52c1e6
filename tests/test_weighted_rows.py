"""The gradient of selected bank scores, sum_c w[q, c] rows[cols[q, c]]: the Triton kernel (Triton's interpreter
on the CPU) and the embedding_bag route, each against a float64 sum, with padding ids of zero weight, repeated
rows, widths that are not multiples of the blocks, and empty inputs."""

from __future__ import annotations

import pytest
import torch

from invprop.kernels import topm
from invprop.kernels.weighted_rows import backend_for, weighted_row_sum

BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "torch"]
KERNEL = {"triton": {"block_c": 16, "block_d": 16}, "torch": {}}  # small blocks: several per row and per query


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "triton" and not topm.available():
        pytest.skip("Triton is not installed")
    return request.param


def problem(q: int = 7, c: int = 45, n: int = 300, dim: int = 24, seed: int = 0):
    """Rows, columns with a third of their weights zero and those columns -1 (padding), some rows repeated."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, dim, generator=gen)
    cols = torch.randint(0, n, (q, c), generator=gen)
    if c > 1:
        cols[:, 1] = cols[:, 0]  # the same row twice in one query
    weights = torch.randn(q, c, generator=gen)
    zero = torch.rand(q, c, generator=gen) < 1 / 3
    weights[zero] = 0
    cols[zero] = -1
    return rows, cols, weights


def reference(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    used = weights != 0
    picked = rows.double()[torch.where(used, cols, 0)] * used.unsqueeze(2)
    return (picked * weights.double().unsqueeze(2)).sum(1)


@pytest.mark.parametrize("shape", [(7, 45, 300, 24), (3, 16, 50, 128), (5, 1, 10, 33)])
def test_equals_the_float64_sum(backend: str, shape: tuple[int, int, int, int]) -> None:
    rows, cols, weights = problem(*shape)
    out = weighted_row_sum(rows, cols, weights, backend=backend, **KERNEL[backend])
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[3])
    assert float((out.double() - reference(rows, cols, weights)).abs().max()) < 1e-4


@pytest.mark.triton
def test_the_kernel_reads_no_row_of_zero_weight() -> None:
    """Padding and unmasked candidates cost the kernel no memory traffic: a NaN row listed only with zero weight
    does not reach the sum (embedding_bag reads row 0 for them, so its sum would be NaN here)."""
    if not topm.available():
        pytest.skip("Triton is not installed")
    rows, cols, weights = problem(seed=3)
    cols[cols == 0] = 1
    cols[weights == 0] = 0
    poisoned = rows.clone()
    poisoned[0] = float("nan")
    out = weighted_row_sum(poisoned, cols, weights, backend="triton", **KERNEL["triton"])
    assert float((out.double() - reference(rows, cols, weights)).abs().max()) < 1e-4


def test_empty_inputs_give_zeros(backend: str) -> None:
    rows = torch.randn(10, 8)
    for q, c in [(0, 5), (4, 0)]:
        cols = torch.zeros(q, c, dtype=torch.long)
        out = weighted_row_sum(rows, cols, torch.zeros(q, c), backend=backend, **KERNEL[backend])
        assert torch.equal(out, torch.zeros(q, 8))


def test_bad_calls_name_the_problem() -> None:
    rows, cols, weights = problem()
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton, got 'cuda'"):
        weighted_row_sum(rows, cols, weights, backend="cuda")
    with pytest.raises(ValueError, match=r"cols \(7, 45\) and weights \(7, 44\) must be the same Q x C"):
        weighted_row_sum(rows, cols, weights[:, :44])


def test_the_kernel_is_chosen_on_cuda_only() -> None:
    assert backend_for(torch.device("cpu")) == "torch"
    assert backend_for(torch.device("cuda")) == ("triton" if topm.available() else "torch")
