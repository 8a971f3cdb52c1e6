"""One-line checks of single config values; each message names the field and says what it must be."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def check_positive_int(value: Any, field: str, hint: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field}={value!r} must be a positive integer{hint}")
    return value


def check_choice(value: Any, field: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(options)}")


def check_int(value: Any, field: str, minimum: int, hint: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{field}={value!r} must be an integer >= {minimum}{hint}")
    return value


def check_number(value: Any, field: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A real number in the given range; the message spells the range as an interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{field}={value!r} must be a finite number in {'(' if low_open or low is None else '['}"
                          f"{lo}, {hi}{')' if high_open or high is None else ']'}")
    return float(value)


def check_bool(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be true or false")


def check_plain_text(value: str | None, field: str) -> None:
    """Text that reaches a generated script (the sbatch header): no newline or other control character, which
    would end the directive and run the rest as a command."""
    if value is None:
        return
    bad = [c for c in str(value) if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ConfigError(f"{field}={str(value)!r} contains a control character ({bad[0]!r}); SLURM settings and "
                          "paths must be plain text: remove it")
