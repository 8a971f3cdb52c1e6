"""Two parts of the GPU check that a timing alone cannot give: whether each top-M selection is still exact on
this device (its GEMMs and float16 rounding are not the CPU's), and where a step's time goes (profiler), so
one short run on a lent GPU says what to change next."""

from __future__ import annotations

from collections.abc import Callable

import torch

from invprop.bank import ShardedBank

# "bound-fallback": `bound` with its sampled bound made to overshoot for every query, so the exact fallback runs;
# "triton": the fused kernel (in Triton's interpreter on a machine without a GPU, its torch route without Triton)
SELECTIONS_CHECKED = ("topk", "bound", "bound-fallback", "filter", "triton")


def crowded_rows(n: int, dim: int, device: torch.device, seed: int, clusters: int = 16,
                 spread: float = 0.1) -> torch.Tensor:
    """Unit rows bunched around a few centres: the scores of a young bank (rows from an untrained network)
    crowd near the M-th largest, where a float16 filter is least sure and has to redo queries. `spread`: the
    offsets' typical length."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=gen), dim=1)
    rows = centres[torch.randint(0, clusters, (n,), generator=gen)]
    rows = rows + spread / dim**0.5 * torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(rows, dim=1).to(device)


def float32_tolerance(dim: int) -> float:
    """How far a float32 dot product of unit vectors of length `dim` may lie from the exact one (a sum of
    `dim` rounded products, each step within a unit roundoff), doubled for the two evaluations compared."""
    return 2.0 * dim * 2.0**-24


def selection_exact(n: int, batch: int, m: int, device: torch.device, dim: int = 128) -> dict:
    """Each selection's top-M against a float64 top-M of the same queries, on spread (random) and crowded bank
    rows (see `audit_selection`); `all_exact` when every one is exact up to float32 rounding."""
    found: dict = {"rows": n, "batch": batch, "m": m, "tolerance": float32_tolerance(dim)}
    for regime in ("random", "crowded"):
        bank = ShardedBank(n, dim, seed=0, device=device, selection="topk")
        if regime == "crowded":
            bank.rows = crowded_rows(n, dim, device, seed=1)
        gen = torch.Generator().manual_seed(2)
        ids = torch.randperm(n, generator=gen)[:batch].to(device)
        # queries near their own rows, as a trained network's embeddings are
        noise = 0.1 / dim**0.5 * torch.randn(batch, dim, generator=gen).to(device)
        z = torch.nn.functional.normalize(bank.rows[ids] + noise, dim=1)
        found[regime] = {selection: audit_selection(bank, z, m, selection) for selection in SELECTIONS_CHECKED}
    found["all_exact"] = all(s["exact"] for regime in ("random", "crowded") for s in found[regime].values())
    return found


def audit_selection(bank: ShardedBank, z: torch.Tensor, m: int, selection: str) -> dict:
    """The rows `selection` marks as the top-m of each query in `z`, judged by float64 scores:
    `max_deficit`, how far the lowest selected row lies below the float64 m-th largest score; `max_excess`, how
    far the highest row left out lies above it (a dropped top row shows here even when a tie fills its place);
    both 0 up to float32 rounding when exact. `same_set`: share of queries whose set equals float64's."""
    tolerance = float32_tolerance(bank.dim)
    exact = z.double() @ bank.rows.double().t()
    ref_vals, ref_ids = exact.topk(m, dim=1)
    kth = ref_vals[:, -1:]
    bank.selection, bank.filter_extra = selection.removesuffix("-fallback"), 0
    bound = bank.selections["bound"]
    sigmas = bound.sample_sigmas
    if selection == "bound-fallback":
        bound.sample_sigmas = -50.0  # the sample's maximum as the bound: far too high for every query
    try:
        top = bank.global_top(z, m)
    finally:
        bound.sample_sigmas = sigmas
    selected = top.in_top & (top.ids >= 0)
    count = selected.sum(dim=1)
    picked = top.ids.masked_fill(~selected, bank.n).sort(dim=1).values  # selected ids ascending, then n
    lowest = exact.gather(1, picked.clamp(max=bank.n - 1)).masked_fill(picked == bank.n, float("inf")).amin(dim=1)
    deficit = (kth.squeeze(1) - lowest).clamp(min=0)
    slot = torch.searchsorted(picked, ref_ids).clamp(max=picked.shape[1] - 1)
    chosen = picked.gather(1, slot) == ref_ids  # each float64 top-m row: selected?
    excess = ((ref_vals - kth) * ~chosen).clamp(min=0)
    deficit, excess = float(deficit.max()), float(excess.max())
    found = {"max_deficit": deficit, "max_excess": excess, "min_count": int(count.min()),
             "max_count": int(count.max()), "same_set": float(((count == m) & chosen.all(dim=1)).float().mean()),
             "exact": bool(deficit <= tolerance and excess <= tolerance and int(count.min()) >= m)}
    if selection == "filter":
        found["filter_extra_after"] = bank.filter_extra
    return found


def _self_time_us(event, on_device: bool) -> float:
    return event.self_device_time_total if on_device else event.self_cpu_time_total


def profile_steps(steps: dict[str, Callable[[], None]], device: torch.device, calls: int = 3,
                  top: int = 12) -> dict:
    """Per named step: time on the device per call (kernels; the CPU's own ops in a dry run), kernel launches
    per call, and the `top` kernels by time, from torch.profiler over `calls` calls after one warm-up. A
    profiler that fails (CUPTI refused, say) costs only its own entry, never the timings beside it."""
    found = {}
    for name, fn in steps.items():
        try:
            found[name] = _profile(fn, device, calls, top)
        except Exception as exc:
            found[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return found


def _profile(fn: Callable[[], None], device: torch.device, calls: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    fn()
    if on_device:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if on_device:
            torch.cuda.synchronize()
    # on the device only kernels and copies: user annotations (the optimiser's step, say) span kernels again
    events = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == on_device
              and not getattr(e, "is_user_annotation", False)]
    if not events:  # CUPTI recorded nothing: say so rather than report zeros
        raise RuntimeError("the profiler recorded no events")
    events.sort(key=lambda e: _self_time_us(e, on_device), reverse=True)
    total_us = sum(_self_time_us(e, on_device) for e in events)
    return {
        "ms_per_call": total_us / calls / 1000,
        "kernels_per_call" if on_device else "ops_per_call": sum(e.count for e in events) / calls,
        "top": [{"name": e.key[:120], "ms_per_call": _self_time_us(e, on_device) / calls / 1000,
                 "calls_per_call": e.count / calls,
                 "share": _self_time_us(e, on_device) / total_us if total_us else 0.0}
                for e in events[:top]]}


def audit_topm(z: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, m: int) -> dict:
    """A top-m (Q x m values and row ids) judged by float64 scores, as `audit_selection` judges a bank's: how far
    the lowest selected row lies below the float64 m-th largest (`max_deficit`), the highest row left out above
    it (`max_excess`), how far a reported value lies from its row's score (`max_value_error`)."""
    tolerance = float32_tolerance(rows.shape[1])
    exact = z.double() @ rows.double().t()
    ref_vals, ref_ids = exact.topk(m, dim=1)
    kth = ref_vals[:, -1:]
    valid = ids >= 0
    picked = exact.gather(1, ids.clamp(min=0))
    deficit = float((kth - picked.masked_fill(~valid, float("inf"))).clamp(min=0).max())
    ordered = ids.sort(dim=1).values
    slot = torch.searchsorted(ordered, ref_ids).clamp(max=ordered.shape[1] - 1)
    chosen = ordered.gather(1, slot) == ref_ids  # each float64 top-m row: selected?
    excess = float(((ref_vals - kth) * ~chosen).clamp(min=0).max())
    value_error = float((vals.double() - picked).abs().masked_fill(~valid, 0).max())
    distinct = bool((ordered[:, 1:] != ordered[:, :-1]).all())
    return {"max_deficit": deficit, "max_excess": excess, "max_value_error": value_error,
            "same_set": float(chosen.all(dim=1).float().mean()),
            "exact": bool(deficit <= tolerance and excess <= tolerance and value_error <= tolerance and distinct
                          and bool(valid.all()))}


def kernel_backends(device: torch.device) -> tuple[str, ...]:
    """The fused top-M routes this machine can run: the torch one always; the Triton one where Triton is
    installed and either a GPU or Triton's interpreter (TRITON_INTERPRET=1, set by tools/gpu/check.py's dry run) is."""
    from invprop.kernels import topm

    if not topm.available():
        return ("torch",)
    import triton

    return ("triton", "torch") if device.type == "cuda" or triton.knobs.runtime.interpret else ("torch",)


def kernel_exact(n: int, batch: int, m: int, device: torch.device, dim: int = 128, **kernel_args: int) -> dict:
    """The fused top-M (invprop/kernels/topm.py), each route, against float64 on spread and crowded rows, plus
    the two forced redo paths: a threshold above every query's M-th score, and a buffer too small to hold the
    rows reaching a threshold below every score."""
    from invprop.kernels.topm import topm

    found: dict = {"rows": n, "batch": batch, "m": m, "tolerance": float32_tolerance(dim)}
    for regime in ("random", "crowded"):
        bank = ShardedBank(n, dim, seed=0, device=device, selection="topk")
        rows = crowded_rows(n, dim, device, seed=1) if regime == "crowded" else bank.rows
        gen = torch.Generator().manual_seed(2)
        pick = torch.randperm(n, generator=gen)[:batch].to(device)
        z = torch.nn.functional.normalize(rows[pick] + 0.1 / dim**0.5 * torch.randn(batch, dim, generator=gen)
                                          .to(device), dim=1)
        found[regime] = {}
        for backend in kernel_backends(device):
            out = topm(z, rows, m, backend=backend, **(kernel_args if backend == "triton" else {}))
            found[regime][backend] = {**audit_topm(z, rows, out.vals, out.ids, m), "redone": out.redone,
                                      "overflowed": out.overflowed, "capacity": out.capacity}
            if regime == "random":
                high = topm(z, rows, m, threshold=torch.full((batch,), 2.0, device=device), backend=backend,
                            **(kernel_args if backend == "triton" else {}))
                full = topm(z, rows, m, threshold=torch.full((batch,), -2.0, device=device), capacity=m + 1,
                            backend=backend, **(kernel_args if backend == "triton" else {}))
                found[regime][backend + "-redo"] = {**audit_topm(z, rows, high.vals, high.ids, m),
                                                    "redone": high.redone}
                found[regime][backend + "-overflow"] = {**audit_topm(z, rows, full.vals, full.ids, m),
                                                        "redone": full.redone, "overflowed": full.overflowed}
    found["all_exact"] = all(s["exact"] for regime in ("random", "crowded") for s in found[regime].values())
    return found
