"""The ImageNet recipe's whole chain at a small size on a SLURM cluster (the local one by default).

`+experiment=imagenet_r50` (ResNet-50, FFCV .beton, the authors' online linear protocol, semisup 1% and 10%) on a
generated ImageNet-shaped JPEG folder (tests/datafiles.py's writer: varied sizes and aspect ratios), shrunk only
in size: images, epochs and image size. Pretraining, then kNN, linear and semisup as chained SLURM jobs; the
script waits for them and writes what results.json holds (and the jobs' states) to --out.

    eval "$(bash slurm/local-cluster.sh env)"
    .venv/bin/python tools/imagenet_chain.py --out docs/results/imagenet_chain.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# small in size, not in kind: the recipe's model, loader and protocols, a few images and epochs
SMALL = ["data.image_size=64", "data.beton_max_resolution=80", "train.epochs=2", "train.batch_size=32",
         "train.precision=fp32", "train.channels_last=false", "train.num_workers=2", "data.eval_workers=2",
         "method.n_pos=10", "method.warmup_epochs=1", "eval.batch_size=64", "eval.linear.epochs=3",
         "eval.linear.milestones=[1,2]", "eval.linear.batch_size=32", "eval.semisup.epochs=2",
         "eval.semisup.batch_size=16", "cluster.timeout_min=30", "eval.timeout_min.knn=30",
         "eval.timeout_min.linear=30", "eval.timeout_min.semisup=30"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def job_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        jid, state = line.split("|")[:2]
        if jid == job_id:
            return state.split()[0]
    return "UNKNOWN"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/imagenet_chain.json")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    if "SLURM_CONF" not in os.environ:
        print('error: SLURM_CONF is not set; run eval "$(bash slurm/local-cluster.sh env)" first', file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    from datafiles import write_image_folder

    work = Path(tempfile.mkdtemp(prefix="imagenet_chain_"))
    folder = write_image_folder(work / "imagenet", classes=args.classes,
                                per_class=(args.train_per_class, args.val_per_class), sizes=(300, 500))
    run = work / "run"
    command = [sys.executable, str(ROOT / "launchers/submit.py"), "+experiment=imagenet_r50", "cluster=slurm",
               f"data.root={folder}", f"data.beton_dir={work / 'betons'}", *SMALL, f"out_dir={run}"]
    print(" ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    jobs = json.loads((run / "jobs.json").read_text())["jobs"]
    states: dict[str, str] = {}
    while time.time() - start < args.timeout_s:
        states = {name: job_state(job) for name, job in jobs.items()}
        print(f"{time.time() - start:6.0f} s  " + "  ".join(f"{k} {v}" for k, v in states.items()), flush=True)
        if all(s in FINISHED for s in states.values()):
            break
        time.sleep(20)
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    record = {"command": " ".join(["launchers/submit.py", *command[2:]]), "images": {
        "train": args.classes * args.train_per_class, "val": args.classes * args.val_per_class,
        "classes": args.classes, "side_px": [300, 500]}, "jobs": states, "wall_s": round(time.time() - start),
        "results": results, "run_dir": str(run)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in results.items() if "top1" in k or "loader" in k}, indent=1))
    return 0 if states and all(s == "COMPLETED" for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
