"""docs/DESIGN.md, "The layout": dependencies point one way, launchers -> jobs -> train/eval -> loss/checkpoint ->
bank -> distributed env; config, data, models and logging are leaves. Nothing lower imports upward."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (module prefix, layer); the longest matching prefix wins
LAYERS = [
    ("invprop", 0), ("invprop.config", 0), ("invprop.data", 0), ("invprop.models", 0), ("invprop.metrics", 0),
    ("invprop.digest", 0), ("invprop.train.progress", 0), ("invprop.logger", 0), ("invprop.kernels", 0),
    ("invprop.state", 0), ("invprop.results", 0), ("invprop.atomic", 0), ("invprop.schedules", 0),
    ("invprop.collectives", 0), ("invprop.distributed", 1),  # collectives: a leaf over torch.distributed
    ("invprop.bank", 2), ("invprop.graph", 2),
    ("invprop.loss", 3), ("invprop.method", 3), ("invprop.checkpoint", 3), ("invprop.testing", 3),
    ("invprop.train", 4), ("invprop.eval", 4), ("invprop.report", 4),
    ("invprop.jobs", 5),
    ("launchers", 6),
]


def layer_of(module: str) -> int:
    found = [(len(prefix), layer) for prefix, layer in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert found, f"{module} has no layer in tests/test_layout.py: add it"
    return max(found)[1]


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def internal_imports(path: Path) -> set[str]:
    """Our modules that `path` imports, anywhere in it; `from pkg import submodule` counts as the submodule."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "invprop":
            if node.module == "invprop":
                deps |= {f"invprop.{a.name}" for a in node.names}
            else:
                subs = {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
                deps |= subs
                if len(subs) < len(node.names):  # a name defined in the module itself
                    deps.add(node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.split(".")[0] == "invprop"}
    return deps


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_no_module_imports_upward() -> None:
    upward = []
    for path in sorted([*(ROOT / "invprop").rglob("*.py"), *(ROOT / "launchers").glob("*.py")]):
        module = module_name(path)
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
        module = module_name(path)
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


# Inside the data package (docs/DESIGN.md, "The layout"): readers and pure helpers at the bottom; the seeded crop
# box and order above them; the torchvision loader, the FFCV subpackage and the .beton writer on top of those;
# the two package __init__ files (which re-export) imported by none of their own modules. Every module is named.
DATA_LAYERS = {
    # readers, pure helpers, and every use of FFCV internals
    "invprop.data.seeding": 0, "invprop.data.color": 0, "invprop.data.batches": 0,
    "invprop.data.cifar": 0, "invprop.data.svhn": 0, "invprop.data.fashion_mnist": 0, "invprop.data.ffcv.compat": 0,
    # the one crop box, the one data order (and row split), synthetic data, colour augmentation; a beton's checks
    "invprop.data.crop": 1, "invprop.data.order": 1, "invprop.data.synthetic": 1, "invprop.data.augment": 1,
    "invprop.data.beton_check": 1,
    # resizing and the probe's crops (their boxes from crop.py); FFCV traversal orders and the seeded decoder
    "invprop.data.geometric": 2, "invprop.data.ffcv.order": 2, "invprop.data.ffcv.decoder": 2,
    # image folders
    "invprop.data.folder": 3,
    # datasets by config; the FFCV loaders
    "invprop.data.datasets": 4, "invprop.data.ffcv.loader": 4,
    # the torchvision loader, the resident images' batches (data.format=device); writing .beton files
    "invprop.data.loader": 5, "invprop.data.device_batches": 5, "invprop.data.beton": 5,
    "invprop.data.beton_cache": 6,
    # the one batch source training draws from, chosen from data.format
    "invprop.data.sources": 7,
    "invprop.data.ffcv": 7, "invprop.data": 7,
}


def _data_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "invprop" / "data").rglob("*.py"))}


def test_data_modules_import_downward_only() -> None:
    modules = _data_modules()
    assert set(modules) == set(DATA_LAYERS), f"name every data module in DATA_LAYERS: {set(modules) ^ set(DATA_LAYERS)}"
    upward = [f"{module} imports {dep}" for module, path in modules.items() for dep in internal_imports(path)
              if dep.startswith("invprop.data") and DATA_LAYERS[dep] >= DATA_LAYERS[module]]
    assert not upward, "\n".join(upward)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` itself is imported (its top-level statements, not function bodies)."""
    tree = ast.parse(path.read_text())
    body = [n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(stmt, ast.FunctionDef | ast.ClassDef)]
    body += [n for stmt in tree.body if isinstance(stmt, ast.ClassDef) for item in stmt.body
             if not isinstance(item, ast.FunctionDef) for n in ast.walk(item)]
    out = {a.name for n in body if isinstance(n, ast.Import) for a in n.names}
    return out | {n.module for n in body if isinstance(n, ast.ImportFrom) and n.module}


def test_only_the_ffcv_subpackage_needs_ffcv_to_import() -> None:
    """FFCV is an optional extra: every other data module (the torchvision path, the .beton writer, its cache)
    imports without it, reaching FFCV only inside the functions that use it."""
    eager = [f"{module} imports {dep}" for module, path in _data_modules().items()
             if not module.startswith("invprop.data.ffcv") for dep in top_level_imports(path)
             if dep.split(".")[0] == "ffcv" or dep.startswith("invprop.data.ffcv")]
    assert not eager, "\n".join(eager)


# FFCV's public API, as its packages export it; everything else of FFCV is an internal, for compat.py alone.
FFCV_PUBLIC = {"ffcv": None, "ffcv.fields": None, "ffcv.fields.decoders": None, "ffcv.transforms": None,
               "ffcv.loader": {"Loader", "OrderOption"}, "ffcv.writer": {"DatasetWriter"}}
FFCV_COMPAT = ROOT / "invprop" / "data" / "ffcv" / "compat.py"


def ffcv_internals(path: Path) -> list[str]:
    """Uses of FFCV internals in `path`: imports of its private names or internal modules, module imports that
    allow patching (`import ffcv.writer as fw`), assignments to anything imported from FFCV, and `ffcv.x._y`."""
    text = path.read_text()
    found = [f"{path.name}: {m.group(0)}" for m in re.finditer(r"\bffcv(?:\.\w+)*\._\w*", text)]
    ffcv_names: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ffcv":
            allowed = FFCV_PUBLIC.get(node.module, set())
            for a in node.names:
                ffcv_names.add(a.asname or a.name)
                if a.name.startswith("_") or (allowed is not None and a.name not in allowed):
                    found.append(f"{path.name}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ffcv":
                    ffcv_names.add((a.asname or a.name).split(".")[0])
                    if a.name != "ffcv" or a.asname:
                        found.append(f"{path.name}: import {a.name}" + (f" as {a.asname}" if a.asname else ""))
    for node in ast.walk(ast.parse(text)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AugAssign | ast.AnnAssign) else []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            targets = node.args[:1]
        targets = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple | ast.List) else [t])]
        for t in targets:
            root = t
            while isinstance(root, ast.Attribute):
                root = root.value
            if root is not t and isinstance(root, ast.Name) and root.id in ffcv_names:
                found.append(f"{path.name}: patches {ast.unparse(t)}")
            elif isinstance(node, ast.Call) and isinstance(t, ast.Name) and t.id in ffcv_names:
                found.append(f"{path.name}: patches {t.id}")
    return found


def test_only_compat_uses_ffcv_internals() -> None:
    paths = sorted([*(ROOT / "invprop").rglob("*.py"), *(ROOT / "launchers").glob("*.py")])
    found = [use for path in paths if path != FFCV_COMPAT for use in ffcv_internals(path)]
    assert not found, "FFCV internals outside invprop/data/ffcv/compat.py:\n" + "\n".join(found)
    assert ffcv_internals(FFCV_COMPAT), "compat.py holds FFCV's internals; the check should see them there"


def test_the_ffcv_check_sees_internals(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import ffcv.writer as fw\nfrom ffcv.libffcv import ctypes_resize\nfrom ffcv.loader import _x\n"
                   "from ffcv.fields import RGBImageField\nfw.sleep = None\nRGBImageField.x = 1\n"
                   "setattr(RGBImageField, 'y', 2)\nimport ffcv\nffcv.loader._private\n")
    found = ffcv_internals(bad)
    assert len(found) == 7, found
    good = tmp_path / "good.py"
    good.write_text("import ffcv\nfrom ffcv.loader import Loader\nfrom ffcv.fields.decoders import IntDecoder\n"
                    "def f():\n    from ffcv.writer import DatasetWriter\n")
    assert ffcv_internals(good) == [] and top_level_imports(good) == {"ffcv", "ffcv.loader", "ffcv.fields.decoders"}
