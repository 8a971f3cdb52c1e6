"""The package metadata states ranges a cluster can satisfy, and the lock CI installs stays inside them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    project = _project()
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["ffcv"] + extras["dev"]]


def test_lock_pins_every_requirement_inside_its_range():
    lock = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not pinned in requirements.lock (make setup would float it)"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} outside {req}"


def test_ranges_admit_a_cluster_environment():
    """The H200 machine's Python 3.12 with its own torch 2.11.0+cu130 (and the matching torchvision 0.26)."""
    project = _project()
    python = SpecifierSet(project["requires-python"])
    assert all(python.contains(v) for v in ("3.11.7", "3.12.3", "3.13.1")) and not python.contains("3.14.0")
    base = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    assert base["torch"].specifier.contains("2.11.0+cu130") and base["torch"].specifier.contains("2.4.0")
    assert base["torchvision"].specifier.contains("0.26.0+cu130")
    assert not any(s.operator == "==" for r in base.values() for s in r.specifier), "no exact pins in the metadata"
    assert "ffcv" not in base, "FFCV is an optional extra: sites that cannot build it use the torchvision path"


def test_make_setup_installs_the_extras_under_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install -q -e '\.\[dev,ffcv\]' -c requirements\.lock", makefile)
