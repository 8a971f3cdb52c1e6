"""`python tools/status.py <run dir or sweep dir> [--json]`: the jobs of a run or sweep, from sacct."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from invprop.jobs.status import find_runs, job_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    runs = find_runs(args.path)
    if not runs:
        print(f"error: no jobs.json in {args.path} or its subfolders (was it submitted with cluster=slurm?)",
              file=sys.stderr)
        return 2
    rows = [row for run in runs for row in job_rows(run)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=str(args.path))
    for col in ("run", "role", "job_id", "state", "restarts", "elapsed", "result"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("run", "role", "job_id", "state", "restarts", "elapsed", "result")))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
