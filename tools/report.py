"""`python tools/report.py <run dirs or sweep dir> [--out DIR] [--json] [--html]`: compare runs in a table and plots.

The table has one row per run: the config keys whose values differ across the runs, then the figures from
results.json. Runs that differ only in `seed` are also summarised per arm (mean [min, max] over the seeds), with
knn_seeds.png and purity_seeds.png (mean curves, a band from the lowest to the highest seed). Plots (losses.png,
knn.png, purity.png) go into the run or sweep directory given (the first one if several), or into --out. --html
writes report.html there instead: one self-contained page with the table and the plots embedded, to open in a
browser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from invprop.report.html import write_html
from invprop.report.seeds import render_seed_markdown, seed_table, write_seed_plots
from invprop.report.table import (
    default_out_dir,
    find_run_dirs,
    render_markdown,
    render_table,
    table_rows,
    write_plots,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", help="run directories and/or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG plots")
    parser.add_argument("--json", action="store_true", help="print the table rows as JSON (no plots)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (with the plots)")
    parser.add_argument("--no-plots", action="store_true", help="only the table")
    parser.add_argument("--html", action="store_true",
                        help="write report.html (table and plots in one self-contained page) instead of the PNGs")
    parser.add_argument("--layout", choices=("auto", "runs", "keys"), default="auto",
                        help="a row per run, or a column per run (auto: columns for up to 8 runs)")
    args = parser.parse_args(argv)
    runs = find_run_dirs(args.paths)
    if not runs:
        print(f"error: no run directory (with config.yaml) in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    columns, rows = table_rows(runs)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not fold the table to 80 columns
        console = Console(width=max(console.width, 240))
    seed_columns, seed_rows = seed_table(runs)
    if args.markdown:
        print(render_markdown(columns, rows))
        if seed_rows:
            print("\nOver seeds (mean [min, max]):\n")
            print(render_seed_markdown(seed_columns, seed_rows))
    else:
        console.print(render_table(columns, rows, title=", ".join(map(str, args.paths)), layout=args.layout))
        if seed_rows:
            print("\nOver seeds (mean [min, max]):\n")
            print(render_seed_markdown(seed_columns, seed_rows))
    if args.html:
        page = write_html(runs, (args.out or default_out_dir(args.paths)) / "report.html",
                          title=f"invprop: {', '.join(map(str, args.paths))}", layout=args.layout)
        console.print(f"wrote {page}", soft_wrap=True)
    elif not args.no_plots:
        written = write_plots(runs, args.out or default_out_dir(args.paths))
        written += write_seed_plots(runs, args.out or default_out_dir(args.paths))
        for path in written:
            console.print(f"wrote {path}")
        if not written:
            console.print("no metrics.jsonl records to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
