"""Check the command line before Hydra runs anything: every element of a `-m` sweep is composed and validated
before the launcher submits any of them, and a composition error (an unknown key, a value of the wrong type, a
missing option) becomes one line naming the field."""

from __future__ import annotations

import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from invprop.config import ConfigError, validate


def sweep_elements(overrides: list[str]) -> list[list[str]]:
    """The override list of each sweep element, as Hydra's basic sweeper expands them: the cartesian product of
    every sweep override's values, in command-line order (through Hydra's public override parser)."""
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [f"{o.get_key_element()}={o.get_value_element_as_str()}"] for o in parsed]
    return [list(element) for element in itertools.product(*choices)]


def composition_message(exc: Exception) -> str:
    """One line for a Hydra composition error, naming the field (or the group) and what to do."""
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        options = ", ".join(o for o in exc.options if not o.endswith("_schema"))
        return f"{exc.missing_cfg_file}: no such option; available: {options}"
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        reason = str(getattr(cause, "msg", cause)).splitlines()[0]
        if "not in" in reason:
            return f"{cause.full_key} is not a setting ({reason}); check its spelling against configs/"
        return f"{cause.full_key}: {reason}; see configs/ for the value it takes"
    return " ".join(str(exc).split())


def check_command_line(overrides: list[str], config_dir: Path, config_name: str = "config",
                       check_values: bool = True) -> list[str]:
    """One message per sweep element (a plain run is one element) that does not compose or, with
    `check_values`, does not validate; empty when all are fine."""
    problems = []
    try:
        elements = sweep_elements(overrides)
    except HydraException as exc:
        return [composition_message(exc)]
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        for element in elements:
            where = f"[{' '.join(element)}] " if len(elements) > 1 else ""
            try:
                cfg = compose(config_name=config_name, overrides=element)
                if check_values:
                    validate(cfg)
            except ConfigError as exc:
                problems.append(f"{where}{exc}")
            except (HydraException, OmegaConfBaseException) as exc:
                problems.append(f"{where}{composition_message(exc)}")
    return problems


def validate_sweep(overrides: list[str], config_dir: Path, config_name: str = "config") -> list[str]:
    """One message per bad element (empty when all are fine)."""
    return check_command_line(overrides, config_dir, config_name)
