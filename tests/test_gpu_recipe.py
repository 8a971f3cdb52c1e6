"""tools/gpu/recipe.sh --dry-run: the prepared GPU recipe check, end to end on tiny synthetic data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "recipe.json"
    proc = subprocess.run(["bash", str(ROOT / "tools/gpu/recipe.sh"), "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_recipe_dry_run_collects_each_runs_curve_and_final_knn(tmp_path: Path) -> None:
    summary = _recipe(tmp_path, "--only", "invp,npid", "--parallel", "2", "--epochs", "1")
    assert summary["env"]["dry_run"] is True
    runs = summary["runs"]
    assert set(runs) == {"invp", "npid"}
    assert runs["npid"]["overrides"] == ["method=npid", "method.bank_init=network"]
    for name, run in runs.items():
        results = json.loads((tmp_path / "recipe_runs" / name / "results.json").read_text())
        assert run["finished"] and run["returncode"] == 0
        assert [c["epoch"] for c in run["curve"]] == [0, 1]  # untrained point, then each epoch
        assert run["knn_backbone_top1"] == results["knn_backbone_top1"]
        assert run["knn_top1"] == results["knn_top1"]
    assert runs["invp"]["own_in_top_m"]  # InvP logs its own-row share; NPID has none
    assert not runs["npid"]["own_in_top_m"]


def test_recipe_deadline_stops_the_wave_and_skips_the_rest(tmp_path: Path) -> None:
    runs = _recipe(tmp_path, "--only", "invp,npid", "--parallel", "1", "--deadline-min", "0")["runs"]
    assert runs["invp"]["finished"] is False and runs["invp"]["returncode"] != 0
    assert runs["npid"] == {"overrides": ["method=npid", "method.bank_init=network"], "skipped": "deadline"}
