"""The prepared recipe check for one lent GPU: several Fashion-MNIST configurations side by side, one JSON.

    tools/gpu/recipe.sh --out $OUT/gpu_recipe.json --fmnist-root DIR     # one H100/H200, < 9 minutes
    tools/gpu/recipe.sh --dry-run --out /tmp/recipe.json                  # CPU, tiny (the test suite runs this)

Each configuration is a plain `launchers/submit.py` run (all 60,000 images, CIFAR ResNet-18, the images resident
on the GPU: `data.format=device`, the torchvision path's crops without its workers; FFCV may not build on the GPU
machine) with a kNN curve every few epochs. Runs start in waves of
`--parallel` (one H200 holds three small runs at once) and every run is stopped at the wall-clock deadline,
so the JSON always comes back: each run's curve (head embeddings, backbone features, bank rows, own row in
top-M), its final kNN on both measures, the untrained and raw-pixel bars, and whether it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from invprop.metrics import read_jsonl, write_json_atomic  # noqa: E402

# The shared part of every configuration: the GPU proxy of docs/RESULTS.md's learning section.
BASE = ["+experiment=fmnist_gpu", "data.format=device", "eval.protocols=[knn]", "eval.every_epochs=2",
        "eval.every_epochs_test_images=10000"]
# name -> overrides. The first wave answers the comparison (InvP vs NPID vs lambda = 0 at one
# budget); the second tries the leads the CPU proxy left open at GPU scale.
RECIPES: dict[str, list[str]] = {
    "invp": [],
    "npid": ["method=npid", "method.bank_init=network"],
    "invp_lambda0": ["method.lambda_inv=0"],
    # what the CPU proxy moved away from: lambda 2.0 (its choice at batch 512), a quarter of the lr (the recipe
    # before that) and batch 512
    "invp_lambda2": ["method.lambda_inv=2.0"],
    "invp_lr_quarter": ["train.lr=0.0075"],
    "invp_b512": ["train.batch_size=512"],
}
# The dry run checks the script end to end (waves, deadline, JSON) on tiny synthetic data in seconds.
DRY_RUN_BASE = ["data=synthetic", "data.n_train=256", "data.n_test=128", "model=resnet_tiny",
                "train.batch_size=64", "train.num_workers=0", "eval.protocols=[knn]", "eval.every_epochs=1",
                "eval.every_epochs_test_images=128", "eval.knn_k=20"]
CURVE_KEYS = ("epoch_knn_top1", "epoch_knn_backbone_top1", "epoch_knn_bank_top1")
FINAL_KEYS = ("knn_top1", "knn_backbone_top1", "knn_bank_top1", "knn_untrained_top1",
              "knn_backbone_untrained_top1", "knn_pixels_top1", "nn1_pixels_top1", "train_wall_s", "wall_s")


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The curve and final figures of one run directory (whatever it got to write)."""
    metrics = run_dir / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.exists() else []
    curve = [{k: r[k] for k in ("epoch", "step", *CURVE_KEYS) if k in r} for r in records if CURVE_KEYS[0] in r]
    own = [(r["epoch"], r["own_in_top_m"]) for r in records if "own_in_top_m" in r]
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return {"curve": curve, "own_in_top_m": own, "finished": "knn_top1" in results and "steps" in results,
            **{k: results[k] for k in FINAL_KEYS if k in results}}


def start(name: str, overrides: list[str], work: Path, python: str, log_dir: Path) -> subprocess.Popen:
    cmd = [python, str(ROOT / "launchers/submit.py"), *overrides, f"out_dir={work / name}"]
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    # Own session: the deadline stops the run and any loader workers it started, nothing else.
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_all(recipes: dict[str, list[str]], base: list[str], work: Path, parallel: int, deadline_s: float,
            python: str) -> dict[str, Any]:
    """Waves of `parallel` runs; anything still running at the deadline is stopped and reported unfinished."""
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    names, out = list(recipes), {}
    for lo in range(0, len(names), parallel):
        wave = {n: start(n, base + recipes[n], work, python, log_dir) for n in names[lo : lo + parallel]}
        started = time.monotonic()
        while any(p.poll() is None for p in wave.values()) and time.monotonic() - t0 < deadline_s:
            time.sleep(2)
        for name, proc in wave.items():
            stop(proc)
            out[name] = {"overrides": recipes[name], "returncode": proc.returncode,
                         "wave_s": time.monotonic() - started, **run_summary(work / name)}
            log_tail = (log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
            out[name]["log_tail"] = log_tail
        if time.monotonic() - t0 >= deadline_s:
            for name in names[lo + parallel :]:
                out[name] = {"overrides": recipes[name], "skipped": "deadline"}
            break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON written at the end")
    parser.add_argument("--fmnist-root", default=None, help="folder with the Fashion-MNIST IDX files")
    # 12 epochs at batch 128 are 5,628 steps a run: three side by side are meant to finish in the first wave
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=3, help="runs side by side on the one GPU")
    parser.add_argument("--deadline-min", type=float, default=8.5, help="wall clock for all runs")
    parser.add_argument("--only", default=None, help="comma-separated recipe names (default: all)")
    parser.add_argument("--work", default=None, help="where the runs live (default: a folder beside --out)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    args = parser.parse_args()

    recipes = RECIPES if args.only is None else {n: RECIPES[n] for n in args.only.split(",")}
    base = [*(DRY_RUN_BASE if args.dry_run else BASE), f"train.epochs={args.epochs}"]
    if args.fmnist_root and not args.dry_run:
        base.append(f"data.root={args.fmnist_root}")
    out_path = Path(args.out)
    work = Path(args.work) if args.work else out_path.with_suffix("").with_name(out_path.stem + "_runs")
    runs = run_all(recipes, base, work, args.parallel, args.deadline_min * 60, sys.executable)
    summary = {"env": {"dry_run": args.dry_run, "base": base, "parallel": args.parallel,
                       "deadline_min": args.deadline_min}, "runs": runs}
    write_json_atomic(out_path, summary)
    for name, run in runs.items():
        final = run.get("knn_backbone_top1")
        print(f"{name:18s} finished={run.get('finished', False)!s:5s} "
              f"kNN head {run.get('knn_top1', float('nan')):.4f} backbone "
              f"{final if final is not None else float('nan'):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
