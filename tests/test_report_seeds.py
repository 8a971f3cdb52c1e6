"""tools/report.py over a seed sweep: runs that differ only in `seed` become one arm with mean and range."""

from __future__ import annotations

import json
from pathlib import Path

from invprop.report.seeds import Spread, render_seed_markdown, seed_table, write_seed_plots

ARMS = {"invp": [0.72, 0.74, 0.73], "npid": [0.70, 0.71, 0.75]}


def _run(root: Path, arm: str, seed: int, top1: float) -> Path:
    run = root / f"{arm}_{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"seed: {seed}\nmethod:\n  name: {arm}\nout_dir: {run}\n")
    (run / "results.json").write_text(json.dumps({"knn_backbone_top1": top1, "knn_pixels_top1": 0.676}))
    lines = [{"step": 15 * e, "epoch": e, "epoch_knn_top1": top1 - 0.01 * (3 - e),
              "epoch_knn_backbone_top1": top1 - 0.02 * (3 - e)} for e in range(4)]
    lines += [{"step": 15 * e + 1, "epoch": e + 0.1, "loss": 1.0, "hp_purity": 0.5 + 0.01 * seed,
               "graph_purity": 0.6} for e in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_arms_get_the_mean_and_range_of_their_seeds(tmp_path: Path) -> None:
    runs = [_run(tmp_path, arm, seed, v) for arm, values in ARMS.items() for seed, v in enumerate(values)]
    columns, rows = seed_table(runs)
    assert [r["arm"] for r in rows] == ["method.name=invp", "method.name=npid"]
    assert [r["seeds"] for r in rows] == ["0,1,2", "0,1,2"]
    invp = rows[0]["knn_backbone_top1"]
    assert isinstance(invp, Spread) and invp.n == 3
    assert (round(invp.mean, 6), invp.low, invp.high) == (0.73, 0.72, 0.74)
    assert "| method.name=npid | 0,1,2 | 72.0 [70.0, 75.0] |" in render_seed_markdown(columns, rows)
    assert [p.name for p in write_seed_plots(runs, tmp_path / "plots")] == ["knn_seeds.png", "purity_seeds.png"]


def test_runs_with_one_seed_each_are_not_grouped(tmp_path: Path) -> None:
    runs = [_run(tmp_path, arm, 0, values[0]) for arm, values in ARMS.items()]
    assert seed_table(runs) == ([], []) and write_seed_plots(runs, tmp_path) == []
