"""docs/DESIGN.md, "The layout": dependencies point one way, launchers -> jobs -> train/eval -> loss/checkpoint ->
bank -> distributed env; config, data, models and logging are leaves. Nothing lower imports upward."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (module prefix, layer); the longest matching prefix wins
LAYERS = [
    ("invprop", 0), ("invprop.config", 0), ("invprop.data", 0), ("invprop.models", 0), ("invprop.metrics", 0),
    ("invprop.digest", 0), ("invprop.train.progress", 0), ("invprop.logger", 0), ("invprop.kernels", 0),
    ("invprop.state", 0),
    ("invprop.collectives", 1), ("invprop.distributed", 1),
    ("invprop.bank", 2), ("invprop.graph", 2),
    ("invprop.loss", 3), ("invprop.checkpoint", 3), ("invprop.testing", 3),
    ("invprop.train", 4), ("invprop.eval", 4),
    ("invprop.jobs", 5),
    ("launchers", 6),
]


def layer_of(module: str) -> int:
    found = [(len(prefix), layer) for prefix, layer in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert found, f"{module} has no layer in tests/test_layout.py: add it"
    return max(found)[1]


def internal_imports(path: Path) -> set[str]:
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "invprop":
            deps |= {f"invprop.{a.name}" for a in node.names} if node.module == "invprop" else {node.module}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.split(".")[0] == "invprop"}
    return deps


def test_no_module_imports_upward() -> None:
    upward = []
    for path in sorted([*(ROOT / "invprop").rglob("*.py"), *(ROOT / "launchers").glob("*.py")]):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for dep in internal_imports(path):
            if layer_of(dep) > own:
                upward.append(f"{module} (layer {own}) imports {dep} (layer {layer_of(dep)})")
    assert not upward, "\n".join(upward)


# Inside the bank package (docs/DESIGN.md, "The layout"): the strategies and the reductions know nothing of the
# bank that uses them, `auto` knows only the strategies, the storage assembles them, and the package's
# __init__ (which re-exports) is imported by none of its own modules.
BANK_LAYERS = [("invprop.bank.select", 0), ("invprop.bank.reductions", 0), ("invprop.bank.autotune", 1),
               ("invprop.bank.storage", 2), ("invprop.bank", 3)]


def bank_layer_of(module: str) -> int:
    found = [(len(p), layer) for p, layer in BANK_LAYERS if module == p or module.startswith(p + ".")]
    assert found, f"{module} has no layer in BANK_LAYERS of tests/test_layout.py: add it"
    return max(found)[1]


def test_bank_modules_import_downward_only() -> None:
    upward = []
    for path in sorted((ROOT / "invprop" / "bank").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for dep in internal_imports(path):
            if not dep.startswith("invprop.bank") or dep == module:
                continue
            among_strategies = dep.startswith("invprop.bank.select") and module.startswith("invprop.bank.select")
            if bank_layer_of(dep) >= bank_layer_of(module) and not among_strategies:
                upward.append(f"{module} imports {dep}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bank.py"
    bad.write_text("from invprop.train.trainer import Trainer\nimport invprop.jobs.submit\n")
    assert {layer_of(d) for d in internal_imports(bad)} == {4, 5} and layer_of("invprop.bank") == 2
    assert layer_of("invprop.bank.select.filter") == 2 and layer_of("invprop.testing.dense_reference") == 3
    assert bank_layer_of("invprop.bank.storage") > bank_layer_of("invprop.bank.autotune") \
        > bank_layer_of("invprop.bank.select.bound")
