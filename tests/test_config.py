"""Bad input fails before any work starts, with one line naming the field."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from composed import compose_config

from invprop.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return compose_config(*overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["nodes=0"], "nodes"),
        (["bank.selection=fastest"], "bank.selection"),
        (["gpus=-1"], "gpus"),
        (["train.epochs=0"], "train.epochs"),
        (["train.batch_size=-4"], "train.batch_size"),
        (["gpus=3", "train.batch_size=128"], "train.batch_size"),
        (["data=synthetic", "train.batch_size=1024"], "train.batch_size"),
        (["method.n_pos=100"], "method.n_pos"),  # k=4, l=3 yield 84 candidates
        (["method.k=0"], "method.k"),
        (["method.l=0"], "method.l"),
        (["data=synthetic", "method.n_background=600"], "method.n_background"),  # M > N=512
        (["method.propagation=dfs"], "method.propagation"),
        (["method.denominator=other"], "method.denominator"),
        (["method.tau=0"], "method.tau"),
        (["train.lr=inf"], "train.lr"),
        (["method.tau=nan"], "method.tau"),
        (["nodes=2"], "nodes"),  # cluster=local: one machine
        (["seed=1180591620717411303424"], "seed"),
        (["data.subset=-5"], "data.subset"),
        # issue 19: each of these was a traceback or silently accepted
        (["model.embedding_dim=0"], "model.embedding_dim"),
        (["train.log_every=0"], "train.log_every"),
        (["data.image_size=16"], "data.image_size"),
        (["data.resize_mode=foo"], "data.resize_mode"),
        (["data.augment.crop_scale=[2,1]"], "data.augment.crop_scale"),
        (["data.augment.crop_scale=[0.5]"], "data.augment.crop_scale"),
        (["train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
        (["train.stop_at_step=0"], "train.stop_at_step"),
        (["data.subset=70000"], "data.subset"),
        (["data.root=/nonexistent"], "data.root"),
        (["logger.name=comet"], "logger"),
        (["logger.views=-1"], "logger.views"),
    ],
)
def test_bad_values_name_their_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(_cfg(*overrides))
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message


@pytest.mark.parametrize(("override", "field"), [("seed=abc", "seed"), ("train.lr=abc", "train.lr"),
                                                 ("method.tau=abc", "method.tau"), ("train.bogus=1", "train.bogus"),
                                                 ("+train.bogus=1", "train.bogus"), ("method=nope", "method"),
                                                 ("data.format=foo", "data.format")])
def test_composition_errors_are_one_line_naming_their_field(override: str, field: str) -> None:
    """Wrong types and unknown keys are refused while composing (the schema), `+key` ones by validate()."""
    from invprop.jobs.sweep import check_command_line

    (message,) = check_command_line([override], ROOT / "configs")
    assert message.startswith(field) and "\n" not in message, message


def test_defaults_and_documented_overrides_validate() -> None:
    validate(_cfg())
    validate(_cfg("train.stop_at_step=5"))
    validate(_cfg("data=synthetic", "model=resnet_tiny", "method.k=8", "method.l=2",
                  "method.n_pos=50", "method.propagation=bfs", "gpus=2"))
    validate(_cfg("data=synthetic", "method=npid", "method.tau=0.1"))
    validate(_cfg("data.subset=2000"))  # M defaults to min(4096, N)


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="^out_dir="):
        validate(_cfg(f"out_dir={target}"))


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_launcher_refuses_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _launch("method.n_pos=500", f"out_dir={out}")
    assert proc.returncode == 2
    assert "method.n_pos=500" in proc.stdout and "candidates" in proc.stdout
    assert not out.exists()


def test_launcher_unknown_key_and_group(tmp_path: Path) -> None:
    proc = _launch("train.bogus=1", f"out_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and proc.stderr.startswith("config error: train.bogus") and proc.stderr.count("\n") == 1
    proc = _launch("method=nope", f"out_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "method" in proc.stderr and "invp" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_every_documented_sweep_composes_and_validates() -> None:
    """The experiment sweeps docs/RESULTS.md gives stay runnable: each element composes and passes validation,
    and the variants change what they say (and nothing else of the method)."""
    from invprop.jobs.sweep import validate_sweep

    variants = sorted(p.stem for p in (ROOT / "configs" / "variant").glob("*.yaml"))
    for experiment in ("fmnist_cpu", "fmnist_gpu", "fmnist_proxy", "fmnist_quick", "fmnist_demo"):
        assert validate_sweep(["+experiment=" + experiment, "+variant=" + ",".join(variants)], ROOT / "configs") == []
    cfg = {v: _cfg("+experiment=fmnist_cpu", f"+variant={v}").method for v in variants}
    assert cfg["npid"].name == "npid" and cfg["npid"].tau == cfg["invp"].tau == 0.2
    assert cfg["lambda0"].lambda_inv == 0 and cfg["invp"].lambda_inv == 0.6
    assert (cfg["bfs"].propagation, cfg["easy"].positives, cfg["k8"].k) == ("bfs", "easy", 8)
    assert (cfg["invp_random_bank"].bank_init, cfg["invp"].bank_init) == ("random", "network")
    assert cfg["invp"].warmup_epochs == 15 // 4


def test_the_cpu_proxy_is_the_gpu_recipe_at_cpu_scale() -> None:
    """Recipe work on the CPU moves the GPU recipe only if the proxy keeps its settings and the ratios that matter."""
    gpu, proxy = _cfg("+experiment=fmnist_gpu"), _cfg("+experiment=fmnist_proxy")
    method = {k: v for k, v in gpu.method.items() if k != "n_background"}
    assert {k: v for k, v in proxy.method.items() if k != "n_background"} == method
    for key in ("batch_size", "lr", "lr_warmup_epochs", "momentum", "weight_decay"):
        assert proxy.train[key] == gpu.train[key], key
    assert (proxy.model.head, proxy.data.name) == (gpu.model.head, gpu.data.name)
    # M as the same share of N: the default min(4096, N) of 60,000 images on the GPU, 683 of the proxy's 10,000
    assert gpu.method.n_background is None and gpu.data.subset == 0
    assert proxy.method.n_background / proxy.data.subset == pytest.approx(4096 / 60000, rel=0.01)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_logger_without_the_package_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        validate(_cfg("logger=wandb"))
    assert str(err.value).startswith("logger=wandb needs the wandb package") and "\n" not in str(err.value)
    validate(_cfg("logger=none"))


def test_a_per_rank_batch_under_16_is_refused_with_the_batch_and_lr_that_fix_it() -> None:
    cfg = _cfg("+experiment=imagenet_r50", "cluster=slurm", "nodes=8", "gpus=8", "data=synthetic")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert message.startswith("train.batch_size=128 puts 2 images per rank") and "\n" not in message
    assert "train.batch_size=2048 (32 per rank" in message and "0.48" in message
    assert "train.allow_small_rank_batch=true" in message and "model.sync_bn=true" in message


@pytest.mark.parametrize("extra", [["train.allow_small_rank_batch=true"],
                                   ["train.batch_size=1024", "data.n_train=2048"]])
def test_a_small_per_rank_batch_runs_when_asked_for_or_raised(extra) -> None:
    validate(_cfg("data=synthetic", "cluster=slurm", "nodes=8", "gpus=8", *extra))  # 128 / 64 = 2 per rank


def test_one_rank_may_train_on_a_small_batch() -> None:
    validate(_cfg("data=synthetic", "train.batch_size=8"))


@pytest.mark.parametrize("override", ["cluster.account='a\nsrun evil'", "cluster.qos='q\rx'",
                                      "cluster.constraint='c\tx'", "out_dir='runs/x\ny'"])
def test_control_characters_never_reach_the_submission_script(override) -> None:
    field = override.split("=")[0]
    cfg = _cfg("cluster=slurm", "data=synthetic") if field != "out_dir" else _cfg("data=synthetic")
    from omegaconf import OmegaConf

    key, value = override.split("=", 1)
    OmegaConf.update(cfg, key, value.strip("'"), merge=False)  # as an experiment YAML could set it
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(f"{field}=") and "contains a control character" in str(info.value)


def test_markup_in_user_text_is_printed_as_is(tmp_path) -> None:
    bad = tmp_path / "[bold]x" / "file"
    bad.parent.mkdir()
    bad.write_text("a file, not a folder")
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), "data=synthetic", f"out_dir='{bad}'"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"out_dir={bad} is a file" in " ".join(proc.stdout.split())
