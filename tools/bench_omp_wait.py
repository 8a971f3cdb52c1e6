"""OpenMP's wait policy on shared cores: a ResNet training step with spinning (ACTIVE) against sleeping (PASSIVE)
waiting threads, alone and beside a competing process, measured in one run.

    python tools/bench_omp_wait.py [--arch resnet50 --size 32 --batch 2 --steps 5 --json]

the launcher sets OMP_WAIT_POLICY=PASSIVE unless the user set it (launchers/submit.py); this is the evidence. Each
measurement is a fresh interpreter (the policy is read when torch loads OpenMP); the competitors keep cores busy as a
data-loader worker (a Python loop) or a second rank (torch with spinning threads) does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEP = """
import time, torch, torchvision
torch.manual_seed(0)
model = getattr(torchvision.models, "{arch}")()
x = torch.randn({batch}, 3, {size}, {size})
model(x).sum().backward()  # warm-up
start = time.perf_counter()
for _ in range({steps}):
    model(x).sum().backward()
print((time.perf_counter() - start) / {steps})
"""

# competitors, started with spinning OpenMP threads: a plain busy loop (a data-loader worker), and the same step
# in an endless loop (a second rank or a second run on the same cores)
BUSY_LOOP = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"
BUSY = ("one_busy_core", "second_rank_spinning")
LOADS = ("idle", *BUSY)


def step_seconds(policy: str, args: argparse.Namespace) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    code = STEP.format(arch=args.arch, batch=args.batch, size=args.size, steps=args.steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    found: dict = {"arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps,
                   "cores": os.cpu_count()}
    for load in LOADS:
        busy = None
        if load in BUSY:
            code = BUSY_LOOP if load == "one_busy_core" else STEP.format(
                arch=args.arch, batch=args.batch, size=args.size, steps=10**6)
            busy = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"})
        try:
            time.sleep(2.0 if busy else 0)  # the competitor is running before the timed steps start
            active, passive = step_seconds("ACTIVE", args), step_seconds("PASSIVE", args)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        found[load] = {"active_s": active, "passive_s": passive, "active_over_passive": active / passive}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the measurement as JSON")
    args = parser.parse_args(argv)
    found = measure(args)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.arch} step, {args.size} px, batch {args.batch}, {found['cores']} cores")
    for column in ("load", "ACTIVE (s/step)", "PASSIVE (s/step)", "ACTIVE / PASSIVE"):
        table.add_column(column, justify="right")
    for load in LOADS:
        row = found[load]
        table.add_row(load, f"{row['active_s']:.3f}", f"{row['passive_s']:.3f}", f"{row['active_over_passive']:.2f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
