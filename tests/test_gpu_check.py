"""tools/gpu_check.sh --dry-run: the prepared GPU check runs the same code on the CPU at tiny sizes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~35 s: every part of the GPU check once, tiny (CI runs it)
@pytest.mark.timeout(600)
def test_gpu_check_dry_run_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["env"]["dry_run"] is True and summary["env"]["device"] == "cpu"
    for key in ("selection_exact", "kernel_exact", "kernel_step_2000", "weighted_rows", "step_resnet50_224",
                "step_resnet18_32", "bank_step_2000", "bank_step_5000", "folder_pipeline", "trainer_step",
                "shared_gpu_ranks", "fmnist_invp"):
        assert "error" not in summary[key], summary[key]
    assert summary["step_resnet50_224"]["invp_img_s"] > 0 and summary["step_resnet50_224"]["ratio"] > 0
    bank = summary["bank_step_5000"]
    for timing in ("ms", "ms_pipelined", "host_ms"):
        assert set(bank[timing]) == {"topk", "bound", "filter", "auto"} and min(bank[timing].values()) > 0
    assert bank["auto_chose"] is None and bank["host_syncs"] is None  # the CPU neither tunes nor counts syncs
    # where the time goes: the profiler's table per step (the CPU's own ops in a dry run)
    assert bank["profile"]["ms_per_call"] > 0 and bank["profile"]["top"][0]["share"] > 0
    assert set(summary["step_resnet50_224"]["profile"]) == {"supervised", "invp"}
    exact = summary["selection_exact"]
    assert exact["all_exact"] is True and {s["same_set"] for s in exact["random"].values()} == {1.0}
    assert set(exact["random"]) == {"topk", "bound", "bound-fallback", "filter", "triton"}
    # the fused top-M kernel: both routes (Triton in its interpreter) exact, the forced redo paths taken
    kernel = summary["kernel_exact"]
    assert kernel["all_exact"] is True
    assert set(kernel["random"]) == {f"{b}{s}" for b in ("triton", "torch") for s in ("", "-redo", "-overflow")}
    assert kernel["random"]["triton-overflow"]["overflowed"] == 16 and kernel["random"]["torch-redo"]["redone"] == 16
    assert set(summary["kernel_step_2000"]["ms"]) == {"triton", "torch", "float32_topk"}
    rows = summary["weighted_rows"]  # the selected scores' backward: the kernel (interpreted) and embedding_bag
    assert set(rows["ms"]) == {"triton", "torch"} and rows["max_abs_diff"] < 1e-4
    assert summary["trainer_step"] == {"host_syncs": None, "bank_selection": "auto"}
    # the goal table: bank step (both timings), the exactness guard and the ResNet-50 ratio (both); the speed
    # goals are never "met" on tiny CPU sizes
    # the two tiny banks stand in for the 1.28M and 10M ones
    small_bank, small = summary["bank_step_2000"], summary["step_resnet18_32"]
    assert [g["measured"] for g in summary["goals"]] == [
        round(small_bank["ms"]["auto"], 3), round(small_bank["ms_pipelined"]["auto"], 3),
        round(bank["ms"]["auto"], 3), round(bank["ms_pipelined"]["auto"], 3), True, True,
        round(summary["step_resnet50_224"]["ratio"], 3), round(summary["step_resnet50_224"]["ratio_pipelined"], 3),
        round(small["ratio"], 3), round(small["ratio_pipelined"], 3), round(small["invp_img_s_pipelined"]), True]
    # the speed goals are never "met" at tiny CPU sizes, nor the shared GPU on the CPU; the exactness guards are
    assert [g["met"] for g in summary["goals"]] == [False] * 4 + [True, True] + [False] * 6
    # two ranks (gloo) against one, from the same inputs: same loss, gradients, bank rows and graph
    shared = summary["shared_gpu_ranks"]
    assert (shared["world"], shared["backend"], shared["devices"], shared["equal"]) == (2, "gloo", ["cpu"], True)
    assert "GPU check against the goals" in proc.stdout
    assert 0 <= summary["fmnist_invp"]["knn_top1"] <= 1
    # the folder part: the trainer's own loader over the generated JPEGs (FFCV is installed here), whole
    # epochs of whole batches, next to the in-memory ResNet-50 step of the same run
    folder = summary["folder_pipeline"]
    assert (folder["loader"], folder["arch"], folder["size"], folder["images_in_folder"]) == ("ffcv", "resnet50",
                                                                                             32, 32)
    assert folder["steps"] == folder["epochs"] * (32 // folder["batch"])
    assert folder["images"] == folder["steps"] * folder["batch"]
    assert folder["img_s"] == pytest.approx(folder["images"] / folder["seconds"])
    assert folder["loader_only_img_s"] > 0 and folder["fixed_batch_img_s"] > 0
    in_memory = summary["step_resnet50_224"]["invp_img_s_pipelined"]
    assert folder["in_memory_invp_img_s"] == in_memory
    assert folder["ratio_to_in_memory"] == pytest.approx(folder["img_s"] / in_memory)


def test_goals_judge_the_issue_targets() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_check import goals

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
    from gpu_probes import selection_exact

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
    from gpu_probes import profile_steps

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
    from gpu_probes import audit_selection

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
    from gpu_probes import audit_selection

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
    from gpu_folder import loader_choice

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
    from gpu_folder import folder_pipeline

    monkeypatch.setitem(sys.modules, "ffcv", None)
    found = folder_pipeline(torch.device("cpu"), 48, 32, 8, "resnet_tiny", 2, 1, (40, 80),
                            {"invp_img_s_pipelined": 10.0})
    assert found["loader"] == "torchvision" and "not importable" in found["loader_why"]
    assert (found["steps"], found["images"], found["images_in_folder"]) == (6, 48, 48)
    assert found["ratio_to_in_memory"] == pytest.approx(found["img_s"] / 10.0)
