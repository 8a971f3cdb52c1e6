"""The golden learning curve: one small fixed CPU run, its loss at fixed steps and its final kNN accuracy, against
the values stored in tests/golden/curve.json (tests/test_golden_curve.py runs the comparison).

    python tools/golden_curve.py                        # run, compare with the stored curve, exit 1 on a mismatch
    python tools/golden_curve.py method.lambda_inv=0.5  # the same with extra overrides (shows what a change does)
    python tools/golden_curve.py --write                # run and store the curve (after an intended change)

The run goes through the launcher (launchers/submit.py, cluster=local, one process, deterministic=true), so it
follows the same config composition and trainer as any run. A silent change of the method or the optimiser
(lambda_inv, lr, ...) moves the curve by more than the tolerances stored with it; the run itself repeats
bit for bit on one machine, and the tolerances leave room for another CPU's float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "curve.json"
# 384 synthetic images, 32 a batch: 12 steps an epoch, 6 epochs; L_inv on from epoch 1 (step 13)
RUN = ("data=synthetic", "data.n_train=384", "data.n_test=128", "model=resnet_tiny", "method=invp",
       "method.warmup_epochs=1", "method.n_pos=10", "train.batch_size=32", "train.epochs=6", "train.log_every=1",
       "train.num_workers=0", "deterministic=true", "seed=0", "logger=none", "eval.protocols=[knn]",
       "eval.untrained_baseline=false", "cluster=local", "gpus=1", "nodes=1")
STEPS = (1, 6, 12, 18, 24, 36, 48, 60, 72)  # where the loss is kept: both sides of the warm-up's end
# |loss - golden| and |kNN top-1 - golden| allowed: the run repeats bit for bit here; lambda_inv 0.6 -> 0.5
# moves the loss by ~0.4, lr 0.03 -> 0.025 by up to ~0.03 (steps 12-60)
TOLERANCE = {"loss": 0.01, "knn_top1": 0.04}


def run_curve(out_dir: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train the fixed run (plus `extra` overrides) into out_dir; its loss at STEPS and final kNN top-1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *RUN, *extra, f"out_dir={out_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the golden run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and record.get("step") in STEPS:
            losses[str(record["step"])] = record["loss"]
    results = json.loads((out_dir / "results.json").read_text())
    return {"loss": losses, "knn_top1": results["knn_top1"]}


def mismatches(found: dict[str, Any], golden: dict[str, Any]) -> list[str]:
    """One line per value outside its tolerance (or missing); empty when the curve matches."""
    tol = golden["tolerance"]
    out = []
    for step, want in golden["loss"].items():
        got = found["loss"].get(step)
        if got is None or abs(got - want) > tol["loss"]:
            out.append(f"loss at step {step}: {got} vs golden {want:.4f} (tolerance {tol['loss']})")
    if abs(found["knn_top1"] - golden["knn_top1"]) > tol["knn_top1"]:
        out.append(f"knn_top1: {found['knn_top1']:.4f} vs golden {golden['knn_top1']:.4f} "
                   f"(tolerance {tol['knn_top1']})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="extra launcher overrides (not with --write)")
    parser.add_argument("--write", action="store_true", help=f"store the run's curve in {GOLDEN.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.write and args.overrides:
        parser.error("--write stores the fixed run only: no extra overrides")
    with tempfile.TemporaryDirectory(prefix="invprop-golden-") as tmp:
        found = run_curve(Path(tmp) / "run", tuple(args.overrides))
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"run": list(RUN), "tolerance": TOLERANCE, **found}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    golden = json.loads(GOLDEN.read_text())
    bad = mismatches(found, golden)
    for line in bad:
        print(f"MISMATCH {line}")
    print("golden curve: " + ("differs" if bad else "matches"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
