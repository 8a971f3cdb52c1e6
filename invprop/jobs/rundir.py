"""A run directory's contract with the commands that continue it.

`identity.json` records what a resume cannot change (invprop/config/identity.py; each checkpoint holds the
same dict). A command that reuses the out_dir of a run with a committed checkpoint is checked against it
*before* anything in the directory is written. Every other change (more epochs, another lr, more ranks) is
continuable; it is appended to `config_history.json` so results.json's numbers can be traced to the
settings each stretch of training ran under, and config.yaml then holds the new settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from invprop import checkpoint
from invprop.atomic import write_json_atomic, write_text_atomic
from invprop.config import ConfigError
from invprop.config.flat import flatten
from invprop.config.identity import run_identity
from invprop.state import RunIdentity

IDENTITY = "identity.json"
HISTORY = "config_history.json"
FINISHED = "FINISHED"  # written by pretraining (invprop/jobs/pretrain.py) when everything else is on disk
_MISSING = object()


def resolved(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tree["out_dir"] = str(run_dir)
    return tree


def has_checkpoint(run_dir: Path) -> bool:
    """Any committed checkpoint (intact or not): training state exists that a resume would continue."""
    return any((d / checkpoint.MARKER).exists() for d in checkpoint.step_dirs(Path(run_dir) / "checkpoints"))


def _recorded(run_dir: Path) -> dict[str, Any] | None:
    """The identity the run recorded (None: the directory was not laid out by invprop's launcher)."""
    path = run_dir / IDENTITY
    return json.loads(path.read_text()) if path.exists() else None


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """ConfigError (one line) naming every fixed key this command changes for a run that has checkpoints: the
    checkpoint's own identity check (invprop.state.RunIdentity), applied before anything is written."""
    run_dir = Path(run_dir)
    if not has_checkpoint(run_dir):
        return
    recorded = _recorded(run_dir)
    if recorded is None:
        return
    try:
        RunIdentity(run_identity(cfg)).load_state_dict(recorded)
    except ValueError as exc:
        raise ConfigError(f"out_dir={run_dir} {exc}") from None


def finished_unchanged(cfg: DictConfig, run_dir: Path) -> int | None:
    """The step a finished run in `run_dir` ended at, when this command would only repeat it: its config.yaml
    holds these very settings and results.json every requested protocol's result. None otherwise."""
    run_dir = Path(run_dir)
    paths = [run_dir / FINISHED, run_dir / "config.yaml", run_dir / "results.json"]
    if not all(p.is_file() for p in paths):
        return None
    recorded = flatten(OmegaConf.to_container(OmegaConf.load(paths[1]), resolve=False))
    if recorded != flatten(resolved(cfg, run_dir)):
        return None
    results = json.loads(paths[2].read_text())
    wanted = ["knn_top1" if p == "knn" else f"eval_{p}_checkpoint" for p in cfg.eval.protocols]
    if not all(key in results for key in wanted):  # e.g. stopped during the linear probe
        return None
    return int(json.loads(paths[0].read_text()).get("step", -1))


def prepare(cfg: DictConfig, run_dir: Path) -> dict[str, list[Any]]:
    """Create the run directory and write config.yaml (every job of the run reads it) and identity.json;
    returns the changes against the previous config.yaml, which are appended to config_history.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tree = resolved(cfg, run_dir)
    changes: dict[str, list[Any]] = {}
    if (run_dir / "config.yaml").exists():
        before = flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False))
        after = flatten(tree)
        changes = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
                   if before.get(k, _MISSING) != after.get(k, _MISSING)}
    if changes:
        history = json.loads((run_dir / HISTORY).read_text()) if (run_dir / HISTORY).exists() else []
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": has_checkpoint(run_dir),
                        "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}})
        write_json_atomic(run_dir / HISTORY, history)
    if changes or not (run_dir / IDENTITY).exists():
        write_json_atomic(run_dir / IDENTITY, run_identity(cfg))
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(tree)))
    return changes
