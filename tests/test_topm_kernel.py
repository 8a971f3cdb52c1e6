"""The fused exact top-M (invprop/kernels/topm.py): Triton kernels (in Triton's interpreter on the CPU) and the
torch route of the same contract, each against a float64 top-M, on spread, crowded and tied rows, with the
threshold too high (too few candidates: redone) and the buffer too small (overflow: redone), and per shard."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from invprop.kernels import topm as topm_module
from invprop.kernels.topm import topm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from gpu.probes import crowded_rows, float32_tolerance  # noqa: E402

# The interpreter runs each kernel instance in numpy: small blocks keep every test to seconds.
KERNEL = {"block_q": 16, "block_n": 64}
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "torch"]
N, D, Q, M = 600, 32, 24, 32


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "triton" and not topm_module.available():
        pytest.skip("Triton is not installed")
    return request.param


def spread_rows(n: int = N, dim: int = D, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)


def queries(rows: torch.Tensor, q: int = Q, seed: int = 1) -> torch.Tensor:
    """Queries near bank rows, as a trained network's embeddings are near their own rows."""
    gen = torch.Generator().manual_seed(seed)
    picked = rows[torch.randperm(rows.shape[0], generator=gen)[:q]]
    noise = 0.1 / rows.shape[1] ** 0.5 * torch.randn(q, rows.shape[1], generator=gen)
    return torch.nn.functional.normalize(picked + noise, dim=1)


def assert_exact(vals: torch.Tensor, ids: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, m: int,
                 id0: int = 0) -> None:
    """(vals, ids) is a float64 top-m up to float32 rounding and ties at the m-th score: m distinct rows, each
    reported with its own score, none below the float64 m-th largest, and none left out above it."""
    tol = float32_tolerance(z.shape[1])
    exact = z.double() @ rows.double().t()
    kth = exact.topk(m, dim=1).values[:, -1:]
    local = ids - id0
    assert vals.shape == ids.shape == (z.shape[0], m)
    assert bool(((local >= 0) & (local < rows.shape[0])).all())
    assert all(len(set(row.tolist())) == m for row in local)
    picked = exact.gather(1, local)
    assert float((vals.double() - picked).abs().max()) <= tol  # each value is its row's score
    assert float((kth - picked).max()) <= tol  # nothing selected below the m-th
    above = exact > kth + tol  # every row clearly above the m-th is selected
    assert torch.equal(above.sum(1), (picked > kth + tol).sum(1))


def test_spread_rows_exact_without_redo(backend: str) -> None:
    rows = spread_rows()
    z = queries(rows)
    found = topm(z, rows, M, backend=backend, hits=4, **KERNEL)
    assert_exact(found.vals, found.ids, z, rows, M)
    assert found.redone == 0 and found.overflowed == 0
    assert found.capacity < N  # a real filter: the sampled threshold left most rows out


def test_sorted_descending_and_torch_equals_triton_up_to_ties() -> None:
    """Both routes give the same rows and bit-close values (float32 rescoring, different summation orders)."""
    if not topm_module.available():
        pytest.skip("Triton is not installed")
    rows = spread_rows(seed=3)
    z = queries(rows, seed=4)
    a = topm(z, rows, M, backend="torch", hits=4)
    b = topm(z, rows, M, backend="triton", hits=4, **KERNEL)
    assert bool((a.vals[:, :-1] >= a.vals[:, 1:]).all()) and bool((b.vals[:, :-1] >= b.vals[:, 1:]).all())
    assert torch.equal(a.ids.sort(1).values, b.ids.sort(1).values)
    torch.testing.assert_close(a.vals, b.vals, rtol=0, atol=float32_tolerance(D))


def test_crowded_rows_exact(backend: str) -> None:
    """Rows bunched near a few centres: many scores within the float16 error bound of the M-th."""
    rows = crowded_rows(N, D, torch.device("cpu"), seed=5, clusters=4, spread=0.05)
    z = queries(rows, seed=6)
    found = topm(z, rows, M, backend=backend, hits=4, **KERNEL)
    assert_exact(found.vals, found.ids, z, rows, M)


def test_bfloat16_inputs_exact(backend: str) -> None:
    rows = crowded_rows(N, D, torch.device("cpu"), seed=7, clusters=8)
    z = queries(rows, seed=8)
    found = topm(z, rows, M, low=rows.to(torch.bfloat16), backend=backend, hits=4, **KERNEL)
    assert_exact(found.vals, found.ids, z, rows, M)


def test_ties_at_the_mth_score(backend: str) -> None:
    """Copies of the rows ranked m-1 .. m+2 of a query: exact up to which of the tied copies is picked."""
    rows = spread_rows(seed=9)
    z = queries(rows, seed=10)
    order = (z @ rows.t()).argsort(dim=1, descending=True)
    rows = rows.clone()
    for r in range(4):
        rows[order[r, M : M + 3]] = rows[order[r, M - 1]].clone()  # three exact copies of the m-th row of query r
    found = topm(z, rows, M, backend=backend, hits=4, **KERNEL)
    assert_exact(found.vals, found.ids, z, rows, M)


def test_threshold_above_the_mth_score_is_redone(backend: str) -> None:
    """A threshold over the true m-th score for half of the queries: exactly those fail the certificate (fewer
    than m rows reach it) and are redone; the other half pass it. Results exact either way."""
    rows = spread_rows(seed=11)
    z = queries(rows, seed=12)
    kth = (z @ rows.t()).topk(M, dim=1).values[:, -1]
    high = torch.arange(Q) % 2 == 0
    threshold = torch.where(high, kth + 0.05, kth - 0.05)
    found = topm(z, rows, M, threshold=threshold, backend=backend, **KERNEL)
    assert found.redone == int(high.sum()) and found.overflowed == 0
    assert_exact(found.vals, found.ids, z, rows, M)


def test_overflowing_buffer_is_redone(backend: str) -> None:
    """Every row reaches a threshold of -2, into a buffer of M + 8 slots: every query overflows and is redone."""
    rows = spread_rows(seed=13)
    z = queries(rows, seed=14)
    found = topm(z, rows, M, threshold=torch.full((Q,), -2.0), capacity=M + 8, backend=backend, **KERNEL)
    assert found.redone == found.overflowed == Q
    assert_exact(found.vals, found.ids, z, rows, M)


def test_a_buffer_just_large_enough_does_not_overflow(backend: str) -> None:
    rows = spread_rows(n=200, seed=15)
    z = queries(rows, seed=16)
    found = topm(z, rows, M, threshold=torch.full((Q,), -2.0), capacity=200, backend=backend, **KERNEL)
    assert found.redone == 0 and found.capacity == 200
    assert_exact(found.vals, found.ids, z, rows, M)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_local_topm_merge_to_the_global_topm(backend: str, world: int) -> None:
    """Each shard's exact local top-M (ids offset by its first row), merged, is the global top-M: the contract
    a rank's selection has in the sharded bank."""
    from invprop.bank import shard_bounds

    rows = crowded_rows(N + 7, D, torch.device("cpu"), seed=17, clusters=16)
    z = queries(rows, seed=18)
    vals, ids = [], []
    for rank in range(world):
        start, stop = shard_bounds(rows.shape[0], rank, world)
        part = topm(z, rows[start:stop], M, id0=start, backend=backend, hits=4, **KERNEL)
        vals.append(part.vals)
        ids.append(part.ids)
    merged, slot = torch.cat(vals, 1).topk(M, dim=1)
    assert_exact(merged, torch.cat(ids, 1).gather(1, slot), z, rows, M)


def test_m_at_least_the_rows_returns_every_row(backend: str) -> None:
    rows = spread_rows(n=40, seed=19)
    z = queries(rows, q=5, seed=20)
    found = topm(z, rows, 64, backend=backend, hits=4, **KERNEL)
    assert found.ids.shape == (5, 40)
    assert_exact(found.vals, found.ids, z, rows, 40)


def test_error_bound_covers_the_low_precision_scores() -> None:
    """The proven bound on |float16-input score - float32 score| holds, and is not vacuous (well under the
    spread of the scores)."""
    rows = crowded_rows(2000, 128, torch.device("cpu"), seed=21)
    z = queries(rows, q=32, seed=22)
    for dtype in (torch.float16, torch.bfloat16):
        low = z.to(dtype).float() @ rows.to(dtype).float().t()
        bound = topm_module.error_bound(z, rows.norm(dim=1).max(), dtype)
        gap = ((z.double() @ rows.double().t()) - low.double()).abs().amax(1)
        assert bool((gap <= bound.double()).all())
        assert float(bound.max()) < 0.05


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="backend must be triton or torch, got 'cuda'"):
        topm(torch.zeros(1, 4), torch.zeros(4, 4), 2, backend="cuda")
