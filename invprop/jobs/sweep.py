"""Validate every element of a `-m` sweep before Hydra's launcher submits any of them."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from invprop.config import ConfigError, validate


def sweep_elements(overrides: list[str]) -> list[list[str]]:
    """The override list of each sweep element, as Hydra's basic sweeper expands them."""
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    return [element for batch in BasicSweeper.split_arguments(parsed, None) for element in batch]


def validate_sweep(overrides: list[str], config_dir: Path, config_name: str = "config") -> list[str]:
    """One message per bad element (empty when all are fine)."""
    problems = []
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        for element in sweep_elements(overrides):
            try:
                validate(compose(config_name=config_name, overrides=element))
            except ConfigError as exc:
                problems.append(f"[{' '.join(element)}] {exc}")
    return problems
