"""Each evaluation protocol's SLURM job gets its own time limit (eval.timeout_min), rendered without submitting."""

from __future__ import annotations

from pathlib import Path

import pytest
from composed import compose_config

from invprop.config import ConfigError, validate
from invprop.jobs.slurm import EvalJob, evaluation_executors


def _params(cfg, tmp_path: Path) -> dict[str, dict]:
    return {protocol: ex._executor.parameters for protocol, ex in evaluation_executors(cfg, tmp_path, "77").items()}


def test_each_protocol_job_gets_its_own_limit_and_null_falls_back_to_the_cluster_one(tmp_path: Path) -> None:
    cfg = compose_config("cluster=slurm", "cluster.eval_timeout_min=45", "eval.protocols=[knn,linear,semisup]",
                         "eval.timeout_min.linear=720", "eval.timeout_min.semisup=300", "eval.nodes=2", "eval.gpus=3")
    params = _params(cfg, tmp_path)
    assert {p: v["time"] for p, v in params.items()} == {"knn": 45, "linear": 720, "semisup": 300}
    for protocol, values in params.items():
        assert values["job_name"] == f"invprop-{protocol}-{tmp_path.name}"
        assert (values["nodes"], values["ntasks_per_node"]) == (2, 3)
        assert values["additional_parameters"]["dependency"] == "afterok:77"


def test_the_imagenet_recipe_gives_the_long_protocols_long_jobs(tmp_path: Path) -> None:
    cfg = compose_config("+experiment=imagenet_r50", "cluster=slurm")
    assert {p: v["time"] for p, v in _params(cfg, tmp_path).items()} == {"knn": 120, "linear": 720, "semisup": 720}


def test_a_job_past_its_limit_is_requeued_as_the_same_protocol() -> None:
    again = EvalJob("/runs/a", "linear").checkpoint()
    assert isinstance(again.function, EvalJob)
    assert (again.function.run_dir, again.function.protocol) == ("/runs/a", "linear")


@pytest.mark.parametrize(("override", "message"), [
    ("eval.timeout_min.linear=0", "eval.timeout_min.linear=0"),
    ("+eval.timeout_min.probe=10", "eval.timeout_min"),
])
def test_bad_limits_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(override))  # what the launcher runs before submitting
