"""Job assembly behind `launchers/submit.py`: validate, lay out the run directory, run or submit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from invprop.config import ConfigError, validate

console = Console()


def resolve_run_dir(cfg: DictConfig) -> Path:
    """out_dir for a single run; each sweep element gets Hydra's own numbered folder under the sweep dir."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # called outside a Hydra app
        return Path(str(cfg.out_dir)).absolute()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.runtime.output_dir).absolute()
    return Path(str(cfg.out_dir)).absolute()


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """The run directory and its resolved config.yaml, which every job of the run reads."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["out_dir"] = str(run_dir)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    tmp.replace(run_dir / "config.yaml")


def summary_table(results: dict, run_dir: Path, cfg: DictConfig) -> Table:
    table = Table(title=f"invprop {cfg.method.name} on {cfg.data.name}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("knn_top1", "knn_backbone_top1", "knn_bank_top1", "knn_untrained_top1",
                "knn_backbone_untrained_top1", "knn_pixels_top1", "linear_top1", "linear_top5",
                "semisup_1pct_top1", "semisup_10pct_top1", "final_train_loss", "epochs", "images", "steps",
                "world_size", "wall_s"):
        if key in results:
            value = results[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("run dir", str(run_dir))
    return table


def _sweep_element_on_slurm() -> bool:
    """Hydra's submitit launcher runs each sweep element's task function inside its SLURM job."""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN and "SLURM_JOB_ID" in os.environ
    except ValueError:
        return False


def main(cfg: DictConfig) -> int:
    """Validate before anything runs or is submitted; then run locally or submit to SLURM."""
    try:
        validate(cfg)
    except ConfigError as exc:
        console.print(f"[bold red]config error:[/] {exc}", soft_wrap=True)
        return 2
    run_dir = resolve_run_dir(cfg)
    if _sweep_element_on_slurm():
        from invprop.jobs.slurm import run_array_element

        prepare_run_dir(cfg, run_dir)
        return run_array_element(cfg, run_dir)
    if cfg.cluster.name == "slurm":
        from invprop.jobs.slurm import submit_run

        prepare_run_dir(cfg, run_dir)
        return submit_run(cfg, run_dir, console)
    from invprop.jobs.local import run_local

    prepare_run_dir(cfg, run_dir)
    results = run_local(cfg, run_dir)
    if "preempted_at_step" in results:
        console.print(f"stopped at step {results['preempted_at_step']} with a committed checkpoint in {run_dir}; "
                      "run the same command again to resume", soft_wrap=True)
        return 3
    console.print(summary_table(results, run_dir, cfg))
    return 0


def run(cfg: DictConfig) -> None:
    code = main(cfg)
    if code:
        sys.exit(code)
