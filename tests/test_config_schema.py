"""The schema (invprop/config/schema.py) and the YAML in configs/ name the same keys, and every value is
stated once: in the YAML, never as a fallback in the schema."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from composed import compose_config
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from invprop.config import group_section
from invprop.config.schema import GROUP_SCHEMAS, Config, field_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _stated(path: Path) -> dict:
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    tree.pop("defaults", None)
    return tree


def _nested_schema(schema: type, key: str) -> type | None:
    hint = typing.get_type_hints(schema)[key]
    return hint if dataclasses.is_dataclass(hint) else None


def _key_differences(schema: type, stated: dict, where: str) -> list[str]:
    """Keys the YAML has that the schema lacks and the other way round, recursing into nested sections."""
    name, keys = schema.__name__, field_names(schema)
    problems = [f"{where}.{k}: in the YAML, not in {name}" for k in sorted(set(stated) - keys)]
    problems += [f"{where}.{k}: in {name}, not in the YAML" for k in sorted(keys - set(stated))]
    for key in sorted(set(stated) & keys):
        nested = _nested_schema(schema, key)
        if nested is not None:
            problems += _key_differences(nested, stated[key], f"{where}.{key}")
    return problems


def _base_option(group: str, option: str) -> str | None:
    """The option another option derives from (its first default names a sibling), else None."""
    first = OmegaConf.load(CONFIGS / group / f"{option}.yaml").defaults[0]
    return first if (CONFIGS / group / f"{first}.yaml").is_file() else None


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_every_group_option_states_exactly_its_schemas_keys(group: str) -> None:
    """A base option names its schema first and states every key once; a derived option (a recipe's settings
    on top of a base option, first default a sibling) states only what it changes, all keys of its base."""
    options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    bases = sorted(o for o in options if _base_option(group, o) is None)
    assert bases == sorted(GROUP_SCHEMAS[group]), f"configs/{group}/ and GROUP_SCHEMAS[{group!r}] differ"
    problems = []
    for option in options:
        path = CONFIGS / group / f"{option}.yaml"
        root = option
        while _base_option(group, root) is not None:
            root = _base_option(group, root)
        if root == option:
            assert OmegaConf.load(path).defaults[0] == f"{option}_schema", f"{path} must name {option}_schema first"
            problems += _key_differences(GROUP_SCHEMAS[group][option], _stated(path), f"{group}/{option}")
        else:
            unknown = set(_stated(path)) - field_names(GROUP_SCHEMAS[group][root])
            problems += [f"{group}/{option}.{k}: not a key of {root}" for k in sorted(unknown)]
    assert not problems, "\n".join(problems)


def test_primary_config_states_exactly_the_schemas_keys() -> None:
    stated = _stated(CONFIGS / "config.yaml")
    stated.pop("hydra")
    groups = set(GROUP_SCHEMAS)
    problems = _key_differences(Config, {**stated, **{g: {} for g in groups}}, "config")
    assert not problems, "\n".join(problems)


def _defaults_of(schema: type) -> list[str]:
    found = []
    for f in dataclasses.fields(schema):
        nested = _nested_schema(schema, f.name)
        if nested is not None:
            found += [f"{f.name}.{d}" for d in _defaults_of(nested)]
        elif f.default is not dataclasses.MISSING and f.default is not MISSING:
            found.append(f.name)
        elif f.default_factory is not dataclasses.MISSING:
            found.append(f.name)
    return found


def test_schemas_state_no_values() -> None:
    schemas = {Config, *(s for options in GROUP_SCHEMAS.values() for s in options.values())}
    stated = {s.__name__: _defaults_of(s) for s in schemas}
    assert not any(stated.values()), f"values belong in configs/: {stated}"


@pytest.mark.parametrize("overrides", [[], ["data=synthetic", "method=npid", "logger=none"],
                                       ["data=cifar10", "model=resnet18_cifar", "cluster=slurm", "logger=wandb"],
                                       ["+experiment=imagenet_r50"]])
def test_composed_configs_leave_nothing_missing(overrides: list[str]) -> None:
    cfg = compose_config(*overrides)
    assert OmegaConf.missing_keys(cfg) == set()


def test_unknown_keys_and_wrong_types_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigKeyError, match="bogus"):
        OmegaConf.merge(compose_config().train, {"bogus": 1})
    with pytest.raises(ValidationError, match="epochs"):
        OmegaConf.merge(compose_config().train, {"epochs": "ten"})
    with pytest.raises(ConfigKeyError, match="k"):  # NPID has no propagation settings
        OmegaConf.merge(group_section("method", "npid"), {"k": 4})


def test_group_section_is_the_yaml_with_overrides() -> None:
    section = group_section("model", "resnet50", head="linear")
    assert (section.arch, section.head, section.hidden_dim) == ("resnet50", "linear", 2048)
    assert OmegaConf.to_container(group_section("data", "cifar10")) == OmegaConf.to_container(
        compose_config("data=cifar10").data)


def test_a_run_config_written_before_a_setting_existed_reads_it_from_configs(tmp_path: Path) -> None:
    from invprop.config import load_run_config

    cfg = compose_config("data=synthetic", "data.n_train=300")
    tree = OmegaConf.to_container(cfg, resolve=False)
    del tree["data"]["noise"], tree["data"]["mean"], tree["cluster"]["run_timeout_h"]  # an older run's record
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(tree))
    loaded = load_run_config(tmp_path / "config.yaml")
    assert (loaded.data.n_train, loaded.data.noise, loaded.data.mean) == (300, 0.35, None)
    assert loaded.cluster.run_timeout_h == 24
    (tmp_path / "other.yaml").write_text("foo: 1\n")  # not an invprop config: read as written
    assert OmegaConf.to_container(load_run_config(tmp_path / "other.yaml")) == {"foo": 1}


def test_a_null_mapping_setting_takes_a_mapping_from_the_command_line() -> None:
    cfg = compose_config("eval.semisup.subset_files={1pct:/data/1percent.txt}")
    assert OmegaConf.to_container(cfg.eval.semisup.subset_files) == {"1pct": "/data/1percent.txt"}
