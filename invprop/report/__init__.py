"""Reports over finished runs and sweeps (tools/report.py): the comparison table and its plots (`table`), the
same as one HTML page (`html`), and the per-arm spread of runs that differ only in their seed (`seeds`)."""
