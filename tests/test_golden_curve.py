"""The golden learning curve (tools/golden_curve.py): a fixed small CPU run through the launcher must reproduce
the loss at fixed steps and the final kNN accuracy stored in tests/golden/curve.json, within the tolerances stored
there. A silent change of a default (method.lambda_inv, train.lr, ...) or of what a step computes moves it.
After an intended change: `python tools/golden_curve.py --write`, and say why in the commit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def _tool():
    spec = importlib.util.spec_from_file_location("golden_curve", ROOT / "tools" / "golden_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fixed_run_reproduces_the_golden_curve(tmp_path: Path) -> None:
    tool = _tool()
    golden = json.loads(tool.GOLDEN.read_text())
    assert golden["run"] == list(tool.RUN), "the stored curve is of another run: rewrite it with --write"
    assert set(golden["loss"]) == {str(s) for s in tool.STEPS}
    found = tool.run_curve(tmp_path / "run")
    bad = tool.mismatches(found, golden)
    assert not bad, "the run left the golden curve:\n" + "\n".join(bad)


def test_mismatches_name_each_value_outside_its_tolerance() -> None:
    tool = _tool()
    golden = {"tolerance": {"loss": 0.02, "knn_top1": 0.04}, "loss": {"1": 6.0, "12": 8.5}, "knn_top1": 0.5}
    assert tool.mismatches({"loss": {"1": 6.019, "12": 8.48}, "knn_top1": 0.539}, golden) == []
    assert tool.mismatches({"loss": {"1": 6.03}, "knn_top1": 0.45}, golden) == [
        "loss at step 1: 6.03 vs golden 6.0000 (tolerance 0.02)",
        "loss at step 12: None vs golden 8.5000 (tolerance 0.02)",
        "knn_top1: 0.4500 vs golden 0.5000 (tolerance 0.04)"]
