"""Config trees as dotted keys: what the run directory's identity and history, and the reports, compare."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}``; lists and empty mappings are leaves."""
    if not isinstance(tree, Mapping):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
