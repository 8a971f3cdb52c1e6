"""Job assembly behind `launchers/submit.py`: validate, lay out the run directory, run or submit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from invprop.config import Config, ConfigError, typed, validate
from invprop.jobs import rundir
from invprop.jobs.errors import fail
from invprop.jobs.runlock import RunLock
from invprop.results import RunResults

console = Console()


def resolve_run_dir(cfg: Config) -> Path:
    """out_dir for a single run; each sweep element gets Hydra's own numbered folder under the sweep dir."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # called outside a Hydra app
        return Path(cfg.out_dir).absolute()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.runtime.output_dir).absolute()
    return Path(cfg.out_dir).absolute()


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse settings the run in `run_dir` cannot continue (before writing anything), then write the run
    directory's config.yaml, identity and history of changes (invprop/jobs/rundir.py)."""
    rundir.check_resume(cfg, run_dir)
    try:
        changes = rundir.prepare(cfg, run_dir)
    except OSError as exc:
        raise ConfigError(f"out_dir={run_dir}: cannot write there ({exc.strerror or exc}); choose another "
                          "out_dir") from None
    if changes and rundir.has_checkpoint(run_dir):
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        console.print(f"continuing {run_dir} with changed settings ({shown}); recorded in {rundir.HISTORY}",
                      soft_wrap=True)


def summary_table(results: RunResults, run_dir: Path, cfg: Config) -> Table:
    table = Table(title=f"invprop {cfg.method.name} on {cfg.data.name}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("knn_top1", "knn_backbone_top1", "knn_bank_top1", "knn_untrained_top1",
                "knn_backbone_untrained_top1", "knn_pixels_top1", "linear_top1", "linear_top5",
                "semisup_1pct_top1", "semisup_10pct_top1", "final_train_loss", "epochs", "images", "steps",
                "world_size", "dist_backend", "loader", "wall_s"):
        value = results.get(key)
        if value is not None:
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
    """Validate before anything runs or is submitted; then run locally or submit to SLURM. The components
    receive the typed config; the composed DictConfig is only what the run directory records."""
    lock = None
    try:
        validate(cfg)
        conf = typed(cfg)
        run_dir = resolve_run_dir(conf)
        if not _sweep_element_on_slurm():  # inside a SLURM job its rank 0 holds the run directory (pretrain)
            if conf.cluster.name == "slurm":
                from invprop.jobs.slurm import check_submission

                check_submission(conf.cluster, run_dir)
            rundir.check_resume(cfg, run_dir)  # a refused resume leaves the run directory as it was, lock included
            done_at = rundir.finished_unchanged(cfg, run_dir)
            if done_at is not None:  # the same command again: touch nothing (not even the lock's holder line)
                console.print(f"{escape(str(run_dir))} already finished this command (step {done_at}; results in "
                              "results.json): nothing to do; change a setting such as train.epochs to continue "
                              "it, or pass a new out_dir= for a new run", soft_wrap=True)
                return 0
            lock = RunLock(run_dir).acquire("launch")
        prepare_run_dir(cfg, run_dir)
    except ConfigError as exc:
        console.print(f"[bold red]config error:[/] {escape(str(exc))}", soft_wrap=True)  # user text: no markup
        return 2
    try:
        return _launch(conf, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _launch(cfg: Config, run_dir: Path) -> int:
    if _sweep_element_on_slurm():
        from invprop.jobs.slurm import run_array_element

        return run_array_element(cfg, run_dir)
    if cfg.cluster.name == "slurm":
        from invprop.jobs.slurm import submit_run

        return submit_run(cfg, run_dir, console)
    from invprop.jobs.local import run_local

    results = run_local(cfg, run_dir)
    if results.preempted_at_step is not None:
        step = results.preempted_at_step
        where = f"at step {step} with a committed checkpoint" if step >= 0 else "before the first checkpoint"
        console.print(f"stopped {where} in {escape(str(run_dir))}; run the same command again to resume",
                      soft_wrap=True)
        return 3
    console.print(summary_table(results, run_dir, cfg))
    return 0


def run(cfg: DictConfig) -> None:
    """The launcher's body: any failure is one line on stderr (INVPROP_VERBOSE=1 adds the traceback)."""
    try:
        code = main(cfg)
    except KeyboardInterrupt:  # Ctrl-C before training installed its handler (or after it ended)
        print("interrupted before training started or after it ended: nothing to save", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the top level: a user sees one line, not a traceback
        fail(exc)
    if code:
        sys.exit(code)
