"""Summaries of finished runs: a comparison table and PNG plots (library part of ``tools/report.py``).

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``results.json`` (docs/DESIGN.md, "Run directories"); a sweep
directory holds run directories (at any depth). The table shows, per run, the config keys whose values differ
across the runs (flattened, dotted) and the evaluation figures from ``results.json``. The plots overlay all
runs: loss terms and lr over steps, kNN accuracy over epochs, and the propagation monitors over epochs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from invprop.config.flat import flatten
from invprop.metrics import read_jsonl
from invprop.results import RunResults

# Config keys that differ between any two runs without saying anything about them.
IGNORED_CONFIG_KEYS = ("out_dir",)
# results.json figures shown in the table, in this order (others matching RESULT_PATTERNS follow).
RESULT_KEYS = ("knn_top1", "knn_backbone_top1", "knn_bank_top1", "knn_untrained_top1", "knn_backbone_untrained_top1",
               "knn_pixels_top1", "nn1_pixels_top1",
               "linear_top1", "linear_top5")
RESULT_PATTERNS = (r"^semisup_.*_top[15]$",)
TRAILING_RESULT_KEYS = ("final_train_loss", "epochs", "steps", "world_size", "train_wall_s", "wall_s")

LOSS_KEYS = ("loss", "loss_ins", "loss_inv", "lr")
KNN_KEYS = ("epoch_knn_top1", "epoch_knn_backbone_top1", "epoch_knn_bank_top1")
# Bars drawn across the kNN plot (results.json, all test images): what training has to clear.
BASELINE_KEYS = {"knn_untrained_top1": ("untrained network", ":"),
                 "knn_backbone_untrained_top1": ("untrained backbone", (0, (1, 3))),
                 "knn_pixels_top1": ("raw pixels", "-.")}
PURITY_KEYS = ("hp_purity", "graph_purity", "own_in_top_m", "empty_candidates")
PLOT_DPI = 100


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_run_dirs(paths: Path | Iterable[Path]) -> list[Path]:
    """Run directories among ``paths``: each path that is a run, else every run below it (sweeps)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for path in map(Path, paths):
        if is_run_dir(path):
            found.append(path)
        elif path.is_dir():
            found.extend(sorted((p.parent for p in path.rglob("config.yaml")
                                 if not any(part.startswith(".") or part in ("checkpoints", "subsets", "submitit")
                                            for part in p.relative_to(path).parts)), key=_natural_key))
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in {q.resolve() for q in unique}:
            unique.append(p)
    return unique


def load_config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(run_dir) / "config.yaml")
    return flatten(OmegaConf.to_container(conf, resolve=False))


def load_results(run_dir: Path) -> dict[str, Any]:
    return RunResults.read(run_dir).to_dict()


_MISSING = "-"


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Flattened keys whose values (or presence) are not the same in every config, in first-seen order."""
    keys: dict[str, None] = {}
    for conf in configs:
        keys.update(dict.fromkeys(conf))
    return [k for k in keys if k not in IGNORED_CONFIG_KEYS
            and len({json.dumps(c.get(k, _MISSING), sort_keys=True, default=str) for c in configs}) > 1]


def result_columns(results: list[dict[str, Any]]) -> list[str]:
    present: dict[str, None] = {}
    for res in results:
        present.update(dict.fromkeys(res))
    cols = [k for k in RESULT_KEYS if k in present]
    cols += sorted((k for k in present if k not in cols and any(re.match(p, k) for p in RESULT_PATTERNS)),
                   key=lambda k: [float(t) if re.fullmatch(r"[\d.]+", t) else t for t in re.split(r"([\d.]+)", k)])
    cols += [k for k in TRAILING_RESULT_KEYS if k in present]
    return cols


def run_label(run_dir: Path, runs: list[Path]) -> str:
    """Shortest readable name: the path relative to the runs' common parent."""
    if len(runs) <= 1:
        return Path(run_dir).name or str(run_dir)
    parts = [Path(r).resolve().parts for r in runs]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return "/".join(Path(run_dir).resolve().parts[common:])


def table_rows(run_dirs: list[Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: one row per run with its differing config values and its result figures."""
    configs = [load_config(r) for r in run_dirs]
    results = [load_results(r) for r in run_dirs]
    diff = differing_keys(configs)
    res_cols = result_columns(results)
    rows = []
    for run, conf, res in zip(run_dirs, configs, results, strict=True):
        row: dict[str, Any] = {"run": run_label(run, run_dirs), "path": str(run)}
        row.update({k: conf.get(k, None) for k in diff})
        row.update({k: res.get(k, None) for k in res_cols})
        rows.append(row)
    return ["run", *diff, *res_cols], rows


def format_value(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def display_value(column: str, value: Any) -> str:
    """A table cell for people: accuracies (``*_top1``/``*_top5``) as percentages, wall times in seconds."""
    if isinstance(value, float) and re.search(r"_top[15]$", column) and not math.isnan(value):
        return f"{100 * value:.1f}%"
    if isinstance(value, float) and column.endswith("wall_s"):
        return f"{value:.0f}"
    return format_value(value)


def render_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A GitHub-markdown table, a row per run; accuracies (``*_top1``/``*_top5``) as percentages."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(display_value(c, row.get(c)).replace("|", "\\|") for c in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def render_table(columns: list[str], rows: list[dict[str, Any]], title: str = "runs", layout: str = "auto"):
    """A rich Table. ``layout="runs"``: a row per run, a column per key (config differences, then results);
    ``"keys"``: the transpose, a column per run (easier to read for a few runs); ``"auto"``: ``keys`` for up
    to 8 runs."""
    from rich.table import Table

    if layout == "auto":
        layout = "keys" if len(rows) <= 8 else "runs"
    if layout not in ("runs", "keys"):
        raise ValueError(f"layout must be auto, runs or keys, got {layout!r}")
    table = Table(title=title)
    if layout == "runs":
        for col in columns:
            table.add_column(col, justify="left" if col == "run" else "right", overflow="fold")
        for row in rows:
            table.add_row(*(format_value(row.get(c)) for c in columns))
        return table
    table.add_column("key", justify="left", overflow="fold")
    for row in rows:
        table.add_column(str(row["run"]), justify="right", overflow="fold")
    n_config = next((i for i, c in enumerate(columns) if c in RESULT_KEYS or c in TRAILING_RESULT_KEYS
                     or any(re.match(p, c) for p in RESULT_PATTERNS)), len(columns))
    for i, col in enumerate(columns[1:], 1):
        table.add_row(col, *(format_value(row.get(col)) for row in rows), end_section=i == n_config - 1)
    return table


# -- curves -------------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(step records, epoch-kNN records)`` from metrics.jsonl, each sorted and de-duplicated by step
    (a resumed run may have rewritten lines: the last one wins)."""
    step_recs: dict[int, dict[str, Any]] = {}
    knn_recs: dict[int, dict[str, Any]] = {}
    for rec in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if "step" not in rec:
            continue
        if any(k in rec for k in KNN_KEYS):
            knn_recs[int(rec["step"])] = rec
        elif "loss" in rec:
            step_recs[int(rec["step"])] = rec
    return [step_recs[s] for s in sorted(step_recs)], [knn_recs[s] for s in sorted(knn_recs)]


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(float(r[x]), float(r[y])) for r in records if r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(keys: tuple[str, ...], series: list[tuple[str, list[dict[str, Any]]]], x: str, xlabel: str,
            title: str, styles: dict[str, str] | None = None, one_panel: bool = False,
            hlines: list[tuple[str, float, str]] | None = None) -> Any:
    """A matplotlib Figure: panels of ``keys`` against ``x`` for every labelled run; None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(_series(recs, x, k)[0] for _, recs in series for k in keys):
        return None
    panels = [keys] if one_panel else [(k,) for k in keys]
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    # One panel with a line per run and key: its legend names each run (colour) and each key (line style) once,
    # beside the axes, where it hides no curve; the figure grows to hold it.
    outside = one_panel and len(series) * len(keys) > 4
    entries = len(series) + len(keys) + len(hlines or [])
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols + (3.0 if outside else 0.0),
                                                  max(3.6 * rows, 0.3 * entries if outside else 0.0)),
                             squeeze=False)
    legend_runs = len(series) <= 12
    for ax, panel in zip(axes.flat, panels, strict=False):
        for i, (label, recs) in enumerate(series):
            color = f"C{i % 10}"
            for key in panel:
                xs, ys = _series(recs, x, key)
                if xs:
                    ax.plot(xs, ys, color=color, linestyle=(styles or {}).get(key, "-"), marker="." if
                            len(xs) < 30 else None, label=label if legend_runs and not outside else None)
        for label, value, style in hlines or []:
            ax.axhline(value, color="grey", linestyle=style, linewidth=1.2, label=label)
        if outside and legend_runs:
            ax.legend(handles=_keyed_handles([label for label, _ in series], panel, styles or {}, ax),
                      fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
        ax.set_xlabel(xlabel)
        ax.set_title(", ".join(panel) if not one_panel else title)
        ax.grid(True, alpha=0.3)
        if legend_runs and not outside and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not one_panel:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> None:
    """Write the figure as a PNG (through a temporary name) and free it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=PLOT_DPI)
    plt.close(fig)
    tmp.replace(path)


def _keyed_handles(runs: list[str], keys: tuple[str, ...], styles: dict[str, str], ax) -> list:
    """Legend entries: each run in its colour, each key in its line style (grey), then the axes' own labelled
    lines (the baselines)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}", label=run) for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="black", linestyle=styles.get(key, "-"), label=key) for key in keys]
    return handles + ax.get_legend_handles_labels()[0]


def plot_figures(run_dirs: list[Path]) -> dict[str, Any]:
    """The figures `write_plots` writes, by file name: ``losses.png``, ``knn.png`` and ``purity.png`` (a plot
    without data is left out)."""
    labelled = [(run_label(r, run_dirs), read_metrics(r)) for r in run_dirs]
    steps = [(label, recs[0]) for label, recs in labelled]
    knn = [(label, recs[1]) for label, recs in labelled]
    figures = {
        "losses.png": _figure(LOSS_KEYS, steps, "step", "step", "loss terms and learning rate"),
        "knn.png": _figure(KNN_KEYS, knn, "epoch", "epoch",
                           "kNN top-1 (solid: head embeddings, dotted: backbone, dashed: bank)",
                           styles={"epoch_knn_bank_top1": "--", "epoch_knn_backbone_top1": ":"}, one_panel=True,
                           hlines=baselines(run_dirs)),
        "purity.png": _figure(PURITY_KEYS, steps, "epoch", "epoch", "propagation monitors"),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_plots(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """``losses.png``, ``knn.png`` and ``purity.png`` in ``out_dir`` (a plot without data is skipped)."""
    written = []
    for name, fig in plot_figures(run_dirs).items():
        _save(fig, Path(out_dir) / name)
        written.append(Path(out_dir) / name)
    return written


def baselines(run_dirs: list[Path]) -> list[tuple[str, float, str]]:
    """(label, value, line style) of each baseline in results.json, once per distinct value (runs on the same
    reference set share them)."""
    found: dict[tuple[str, float], str] = {}
    for run in run_dirs:
        results = load_results(run)
        for key, (label, style) in BASELINE_KEYS.items():
            if isinstance(results.get(key), (int, float)):
                found.setdefault((label, round(float(results[key]), 4)), style)
    many = len({label for label, _ in found}) < len(found)
    return [(f"{label} {value:.1%}" if many else label, value, style) for (label, value), style in found.items()]


def default_out_dir(paths: list[Path]) -> Path:
    """Where plots go by default: the single run or sweep directory given, else the first one."""
    return Path(paths[0])
