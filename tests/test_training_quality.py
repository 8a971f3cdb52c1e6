"""Training must learn: the default config's shortest run beats its untrained network on both kNN measures.

The command is the one a new user tries first (`launchers/submit.py data=fashion_mnist data.subset=2000
model=resnet_tiny train.epochs=2`: 30 steps). The bar is the same weighted kNN (K=200, sigma=0.07, reference =
the training subset, all test images) on the network before its first step, measured in the same run, on the
head's embeddings (`knn_untrained_top1`) and on the backbone's pooled features (`knn_backbone_untrained_top1`).
With the paper's settings (random bank rows, tau 0.07, crops from 20%) this run ended 11 points *below* the
untrained network; with today's defaults (rows from the network, tau 0.1, crops of 35-100%) it ends +5.4 / +5.9
(seed 0) and +6.8 / +7.5 (seed 1) above it (docs/RESULTS.md, "Learning quality").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MARGIN = 0.03  # the goal; measured +5.4 points at the least


def test_default_config_beats_its_untrained_network_on_both_measures(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launchers/submit.py"), "data=fashion_mnist", "data.subset=2000",
           "model=resnet_tiny", "train.epochs=2", "logger=none", f"out_dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["images"] == 2000 and results["epochs"] == 2
    for trained, untrained in (("knn_top1", "knn_untrained_top1"),
                               ("knn_backbone_top1", "knn_backbone_untrained_top1")):
        gain = results[trained] - results[untrained]
        assert gain >= MARGIN, (f"{trained} {results[trained]:.4f} vs untrained {results[untrained]:.4f}: "
                                f"gain {gain:+.4f} < {MARGIN}")
