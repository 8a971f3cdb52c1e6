"""One self-contained HTML page for a run or a sweep: the comparison table and the curves as embedded PNGs.

The page needs nothing beside itself (no scripts, no external files), so it can be mailed, archived with the
run or opened straight from a cluster's shared disk. The table and plots are those of ``tools/report.py``.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
from pathlib import Path
from typing import Any

from invprop.atomic import write_text_atomic
from invprop.report.table import (
    RESULT_KEYS,
    RESULT_PATTERNS,
    TRAILING_RESULT_KEYS,
    display_value,
    table_rows,
    write_plots,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.run, th.run { text-align: left; font-family: monospace; }
tbody th { text-align: left; font-weight: normal; font-family: monospace; }
div.scroll { overflow-x: auto; }
th.config { background: #e8f0fb; }
th.result { background: #eaf6ea; }
figure { margin: 1em 0; }
img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def column_kind(column: str) -> str:
    """``run``, ``config`` (a config key that differs between the runs) or ``result`` (results.json)."""
    if column == "run":
        return "run"
    if column in RESULT_KEYS or column in TRAILING_RESULT_KEYS or any(re.match(p, column) for p in RESULT_PATTERNS):
        return "result"
    return "config"


def table_html(columns: list[str], rows: list[dict[str, Any]], layout: str = "auto") -> str:
    """``layout="runs"``: a row per run, a column per key; ``"keys"``: a row per key, a column per run (easier
    to read for a few runs); ``"auto"``: ``keys`` for up to 8 runs, as on the console."""
    if layout == "auto":
        layout = "keys" if len(rows) <= 8 else "runs"
    if layout not in ("runs", "keys"):
        raise ValueError(f"layout must be auto, runs or keys, got {layout!r}")

    def value(col: str, row: dict[str, Any]) -> str:
        return html.escape(display_value(col, row.get(col)))

    def run_cell(row: dict[str, Any], tag: str) -> str:
        path, name = html.escape(str(row.get("path", ""))), html.escape(str(row["run"]))
        return f'<{tag} class="run" title="{path}">{name}</{tag}>'

    if layout == "runs":
        head = "".join(f'<th class="{column_kind(c)}">{html.escape(c)}</th>' for c in columns)
        body = ["<tr>" + run_cell(row, "td") + "".join(f'<td class="{column_kind(c)}">{value(c, row)}</td>'
                                                       for c in columns[1:]) + "</tr>" for row in rows]
    else:
        head = '<th class="run">key</th>' + "".join(run_cell(row, "th") for row in rows)
        body = [f'<tr><th class="{column_kind(c)}">{html.escape(c)}</th>'
                + "".join(f"<td>{value(c, row)}</td>" for row in rows) + "</tr>" for c in columns[1:]]
    return (f'<div class="scroll"><table id="runs" data-layout="{layout}">\n<thead><tr>{head}</tr></thead>\n'
            "<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table></div>")


def image_html(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def configs_html(run_dirs: list[Path], labels: list[str]) -> str:
    """Each run's whole config.yaml, folded (the table shows only what differs)."""
    parts = []
    for run, label in zip(run_dirs, labels, strict=True):
        text = (Path(run) / "config.yaml").read_text()
        parts.append(f"<details><summary>{html.escape(label)}</summary><pre>{html.escape(text)}</pre></details>")
    return "\n".join(parts)


def render_html(run_dirs: list[Path], title: str, layout: str = "auto") -> str:
    """The page as a string: title, table, the plots that have data, and the folded configs."""
    columns, rows = table_rows(run_dirs)
    with tempfile.TemporaryDirectory(prefix="invprop-report-") as tmp:
        figures = [image_html(p, p.stem) for p in write_plots(run_dirs, Path(tmp))]
    curves = "\n".join(figures) if figures else "<p>no metrics.jsonl records to plot</p>"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(rows)} runs: the config keys that differ between them, then the results (results.json).</p>"
        if len(rows) > 1 else "<p>One run: its results (results.json); its whole config is below.</p>",
        table_html(columns, rows, layout),
        "<h2>Curves</h2>",
        curves,
        "<h2>Configs</h2>",
        configs_html(run_dirs, [str(r["run"]) for r in rows]),
        "</body></html>",
        "",
    ])


def write_html(run_dirs: list[Path], path: Path, title: str, layout: str = "auto") -> Path:
    """Write the page to ``path`` through a temporary file in the same folder (never half a page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(run_dirs, title, layout)
    write_text_atomic(path, page)  # 0666 less the umask: readable by others on a shared disk
    return path
