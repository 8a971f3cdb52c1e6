"""Runs that differ only in `seed`, summarised together: mean and range of every figure (tools/report.py).

A sweep such as `seed=0,1,2 +variant=invp,lambda0,npid` gives nine runs; grouped by every differing config key
except the seed they are three arms with three seeds each. The table shows per arm the mean and the [min, max]
over its seeds; the plots draw each arm's mean curve with a band from the lowest to the highest seed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invprop.report.table import (
    BASELINE_KEYS,
    KNN_KEYS,
    PURITY_KEYS,
    differing_keys,
    load_config,
    load_results,
    read_metrics,
    result_columns,
)

SEED_KEY = "seed"


@dataclass(frozen=True)
class Spread:
    """Mean and range of one figure over a group's seeds."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        if not values:
            return None
        return cls(statistics.fmean(values), min(values), max(values), len(values))

    def show(self, percent: bool) -> str:
        scale, unit = (100.0, "") if percent else (1.0, "")
        mid = f"{scale * self.mean:.1f}{unit}" if percent else f"{self.mean:.4g}"
        if self.n == 1:
            return mid
        lo, hi = (f"{scale * self.low:.1f}", f"{scale * self.high:.1f}") if percent else \
            (f"{self.low:.4g}", f"{self.high:.4g}")
        return f"{mid} [{lo}, {hi}]"


def seed_groups(run_dirs: list[Path]) -> tuple[list[str], list[tuple[dict[str, Any], list[Path]]]]:
    """(the keys that tell the groups apart, [(those keys' values, the group's runs)]); one group per distinct
    setting of every differing key but the seed, in first-seen order. Empty when the runs share one seed or
    no two runs differ only in it."""
    configs = [load_config(r) for r in run_dirs]
    diff = differing_keys(configs)
    if SEED_KEY not in diff:
        return [], []
    keys = [k for k in diff if k != SEED_KEY]
    groups: dict[tuple, tuple[dict[str, Any], list[Path]]] = {}
    for run, conf in zip(run_dirs, configs, strict=True):
        values = {k: conf.get(k) for k in keys}
        groups.setdefault(tuple(repr(values[k]) for k in keys), (values, []))[1].append(run)
    found = list(groups.values())
    if all(len(runs) == 1 for _, runs in found):
        return [], []
    shown = _distinguishing(keys, [values for values, _ in found])
    return shown, [({k: values[k] for k in shown}, runs) for values, runs in found]


def _distinguishing(keys: list[str], settings: list[dict[str, Any]]) -> list[str]:
    """A few keys that tell every group from every other (for short labels): greedily the key that separates the
    most pairs not yet separated, and `method.name` whenever it differs."""
    pairs = {(i, j) for i in range(len(settings)) for j in range(i + 1, len(settings))}
    chosen: list[str] = []

    def separated(key: str) -> set[tuple[int, int]]:
        return {(i, j) for i, j in pairs if repr(settings[i][key]) != repr(settings[j][key])}

    named = "method.name" in keys and bool(separated("method.name"))
    while pairs:
        best = max((k for k in keys if k not in chosen), key=lambda k: len(separated(k)), default=None)
        if best is None or not separated(best):
            break
        chosen.append(best)
        pairs -= separated(best)
    if named and "method.name" not in chosen:
        chosen.append("method.name")
    return [k for k in keys if k in chosen]


def group_label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


def seed_table(run_dirs: list[Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): a row per group with the seeds it holds and the Spread of each result figure."""
    keys, groups = seed_groups(run_dirs)
    if not groups:
        return [], []
    columns = result_columns([load_results(r) for r in run_dirs])
    rows = []
    for values, runs in groups:
        results = [load_results(r) for r in runs]
        row: dict[str, Any] = {"arm": group_label(values),
                               "seeds": ",".join(str(load_config(r).get(SEED_KEY)) for r in runs)}
        row.update({c: Spread.of([res.get(c) for res in results]) for c in columns})
        rows.append(row)
    return ["arm", "seeds", *columns], rows


def render_seed_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracies as percentages, 'mean [min, max]' over the seeds."""
    def cell(column: str, value: Any) -> str:
        if isinstance(value, Spread):
            return value.show(percent=column.endswith(("_top1", "_top5")))
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def curve_spread(runs: list[Path], key: str, which: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean, min, max) of metric `key` over the runs at the x values every run has; `which` 0: step
    records against epoch, 1: the epoch kNN records."""
    per_run = []
    for run in runs:
        records = read_metrics(run)[which]
        per_run.append({round(float(r["epoch"]), 3): float(r[key]) for r in records
                        if r.get(key) is not None and r.get("epoch") is not None})
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    ys = [[p[x] for p in per_run] for x in common]
    return common, [statistics.fmean(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def _shared_baselines(run_dirs: list[Path]) -> list[tuple[str, float, str]]:
    """(label, value, style) of each results.json baseline that has one value over all the runs."""
    found = []
    for key, (label, style) in BASELINE_KEYS.items():
        values = {round(float(load_results(r)[key]), 4) for r in run_dirs
                  if isinstance(load_results(r).get(key), (int, float))}
        if len(values) == 1:
            value = values.pop()
            found.append((f"{label} {value:.1%}", value, style))
    return found


def write_seed_plots(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """knn_seeds.png (backbone and head kNN) and purity_seeds.png: each arm's mean over its seeds, a band from
    the lowest to the highest seed. Nothing when the runs have no seed groups."""
    _, groups = seed_groups(run_dirs)
    if not groups:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, keys, which, bars in (("knn_seeds.png", KNN_KEYS[:2], 1, True),
                                    ("purity_seeds.png", PURITY_KEYS[:2], 0, False)):
        fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.2), squeeze=False)
        drawn = False
        for ax, key in zip(axes.flat, keys, strict=True):
            for i, (values, runs) in enumerate(groups):
                xs, mean, low, high = curve_spread(runs, key, which)
                if not xs:
                    continue
                drawn = True
                ax.plot(xs, mean, color=f"C{i}", marker="." if len(xs) < 30 else None,
                        label=f"{group_label(values)} (n={len(runs)})")
                ax.fill_between(xs, low, high, color=f"C{i}", alpha=0.2, linewidth=0)
            if bars:  # the bars every seed shares (raw pixels); the untrained network differs by seed
                for label, value, style in _shared_baselines(run_dirs):
                    ax.axhline(value, color="grey", linestyle=style, linewidth=1.0, label=label)
            ax.set_title(f"{key}: mean over seeds, band = min..max")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        if drawn:
            fig.tight_layout()
            out = Path(out_dir) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.stem}.tmp.png")
            fig.savefig(tmp, dpi=100)
            tmp.replace(out)
            written.append(out)
        plt.close(fig)
    return written
