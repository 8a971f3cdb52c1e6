"""tools/gpu/check.sh --dry-run: the prepared GPU check runs the same code on the CPU at tiny sizes, and the parts
that judge correctness (not speed) pass there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~35 s: every part of the GPU check once, tiny (CI runs it)
@pytest.mark.timeout(600)
def test_gpu_check_dry_run_passes_its_correctness_checks(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "tools/gpu/check.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    failed = {key: part["error"] for key, part in summary.items() if isinstance(part, dict) and "error" in part}
    assert failed == {}  # a part that raised records its error instead of its figures
    # every selection, and both routes of the fused kernel, return the float64 top-M on spread and crowded rows
    for probe in ("selection_exact", "kernel_exact"):
        audited = {f"{regime}/{name}": part["exact"] for regime in ("random", "crowded")
                   for name, part in summary[probe][regime].items()}
        assert len(audited) >= 6 and all(audited.values()), (probe, audited)
    # and the kernel's forced redo paths were taken, not skipped
    kernel = summary["kernel_exact"]["random"]
    assert kernel["torch-redo"]["redone"] > 0 and kernel["torch-overflow"]["overflowed"] > 0
    assert summary["weighted_rows"]["max_abs_diff"] < 1e-4  # the selected scores' backward: kernel = embedding_bag
    # two ranks sharing a device equal one rank from the same inputs (loss, gradients, rows, graph)
    assert summary["shared_gpu_ranks"]["equal"] is True
    # the folder pipeline trains whole epochs of whole batches over the images it wrote
    folder = summary["folder_pipeline"]
    assert folder["steps"] == folder["epochs"] * (folder["images_in_folder"] // folder["batch"])
    assert folder["images"] == folder["steps"] * folder["batch"]
    # the goal table is the judgement of the figures written beside it; speed is never "met" in a dry run
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.check import goals

    assert summary["goals"] == goals(summary)
    assert not any(g["met"] for g in summary["goals"] if isinstance(g["measured"], float))


def test_goals_judge_the_issue_targets() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.check import goals

    bank = {"rows": 1_281_167, "ms": {"auto": 1.9}, "ms_pipelined": {"auto": 2.1}, "auto_chose": "triton"}
    summary = {"env": {"dry_run": False}, "bank_step_1281167": bank,
               "bank_step_10000000": {"rows": 10**7, "ms": {"auto": 14.0}, "ms_pipelined": {"auto": 16.0}},
               "step_resnet50_224": {"ratio": 0.94, "ratio_pipelined": 0.95},
               "step_resnet18_32": {"ratio": 0.97, "ratio_pipelined": 0.9, "invp_img_s_pipelined": 31_000},
               "shared_gpu_ranks": {"equal": True, "devices": ["cuda:0"]}}
    assert [(g["measured"], g["met"]) for g in goals(summary)] == [
        (1.9, True), (2.1, False), (14.0, True), (16.0, False), (0.94, False), (0.95, True), (0.97, True),
        (0.9, False), (31_000, True), (True, True)]
    assert "1,281,167 rows" in goals(summary)[0]["goal"] and "10,000,000 rows" in goals(summary)[2]["goal"]
    bank["ms"]["auto"] = 2.0
    assert goals(summary)[0]["met"] is True  # "<= 2 ms"
    summary["shared_gpu_ranks"]["devices"] = ["cpu"]  # ranks that never shared a GPU do not meet it
    assert goals(summary)[-1]["met"] is False


def test_selection_exact_flags_a_selection_that_misses_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exactness probe is not vacuous: a selection that loses its best row per query is reported."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.probes import selection_exact

    from invprop.bank import ShardedBank

    select = ShardedBank.select_local

    def lossy(self, zq, m_sel, strategy):
        vals, ids, ascending = select(self, zq, m_sel, strategy)
        if strategy != "filter":
            return vals, ids, ascending
        best = vals.argmax(dim=1, keepdim=True)  # drop each query's top row: a different row takes its place
        return vals.scatter(1, best, -1.0), ids.scatter(1, best, 0), ascending

    monkeypatch.setattr(ShardedBank, "select_local", lossy)
    found = selection_exact(3000, 8, 64, torch.device("cpu"))
    assert found["all_exact"] is False
    for regime in ("random", "crowded"):
        assert found[regime]["topk"]["exact"] and found[regime]["bound"]["exact"]
        assert not found[regime]["filter"]["exact"] and found[regime]["filter"]["same_set"] == 0.0


def test_a_failing_profile_costs_only_its_own_entry() -> None:
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.probes import profile_steps

    def refused() -> None:
        raise RuntimeError("CUPTI refused")

    found = profile_steps({"sum": lambda: torch.ones(64).sum(), "refused": refused}, torch.device("cpu"))
    assert found["refused"] == {"error": "RuntimeError: CUPTI refused"}
    assert found["sum"]["ops_per_call"] >= 1 and any(row["name"] == "aten::sum" for row in found["sum"]["top"])


def _tied_bank(n: int, m: int) -> tuple:
    """A bank and one query whose m-th and (m+1)-th best rows are the same vector (an exact tie)."""
    import torch

    from invprop.bank import ShardedBank

    bank = ShardedBank(n, 128, seed=0, selection="topk")
    noise = 0.01 * torch.randn(1, 128, generator=torch.Generator().manual_seed(0))
    z = torch.nn.functional.normalize(bank.rows[:1] + noise, dim=1)
    order = (z @ bank.rows.t()).argsort(dim=1, descending=True)[0]
    rows = bank.rows.clone()
    rows[order[m]] = rows[order[m - 1]]
    bank.rows = rows
    return bank, z


def test_audit_flags_a_dropped_top_row_even_when_a_tie_fills_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks 2..m+1 instead of 1..m, the (m+1)-th tied with the m-th: every selected row reaches the m-th score
    (no deficit, m rows), but the best row is missing; only `max_excess` can tell."""
    import sys


    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.probes import audit_selection

    from invprop.bank import ShardedBank

    n, m = 3000, 64
    bank, z = _tied_bank(n, m)
    assert audit_selection(bank, z, m, "topk")["exact"]

    def skips_the_best(self, zq, m_sel, strategy):
        vals, cols = (zq @ self.rows.t()).topk(m_sel + 1, dim=1)
        return vals[:, 1:], cols[:, 1:] + self.start, False

    monkeypatch.setattr(ShardedBank, "select_local", skips_the_best)
    found = audit_selection(bank, z, m, "topk")
    assert found["max_deficit"] == 0.0 and found["min_count"] == m  # what the deficit check alone would pass
    assert found["max_excess"] > 0.01 and not found["exact"] and found["same_set"] == 0.0


def test_audit_of_bound_fallback_takes_the_exact_route(exact_topk_calls) -> None:
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.probes import audit_selection

    from invprop.bank import ShardedBank

    bank = ShardedBank(4000, 128, seed=0)
    z = torch.nn.functional.normalize(torch.randn(8, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    sigmas = bank.selections["bound"].sample_sigmas
    assert audit_selection(bank, z, 256, "bound")["exact"] and exact_topk_calls == []  # the sampled bound held
    found = audit_selection(bank, z, 256, "bound-fallback")
    assert found["exact"] and exact_topk_calls == [(8, 256)]  # every query through the exact fallback
    assert bank.selections["bound"].sample_sigmas == sigmas and bank.selection == "bound"  # the setting restored


def test_folder_part_names_the_torchvision_fallback_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where FFCV does not import (a GPU machine that could not build it) the part says it measures the
    trainer's torchvision path, with the import error as the reason."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.folder import loader_choice

    assert loader_choice()[0] == "ffcv"
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now raises ImportError
    loader, why = loader_choice()
    assert loader == "torchvision"
    assert why.startswith("FFCV is not importable (import of ffcv halted") and "torchvision fallback" in why


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_folder_part_runs_through_torchvision_without_ffcv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU machine without FFCV: the part still trains end to end, through the trainer's torchvision loader."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu.folder import folder_pipeline

    monkeypatch.setitem(sys.modules, "ffcv", None)
    found = folder_pipeline(torch.device("cpu"), 48, 32, 8, "resnet_tiny", 2, 1, (40, 80),
                            {"invp_img_s_pipelined": 10.0})
    assert found["loader"] == "torchvision" and "not importable" in found["loader_why"]
    assert (found["steps"], found["images"], found["images_in_folder"]) == (6, 48, 48)
    assert found["ratio_to_in_memory"] == pytest.approx(found["img_s"] / 10.0)
