"""Issue 19's findings on real runs: checkpoints that stay valid, resumes that refuse what they cannot continue,
metrics without repeated steps, local ranks that stop on a signal, and one line for bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from invprop import checkpoint
from invprop.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
SMALL = ["data=synthetic", "data.n_train=384", "data.n_test=128", "train.batch_size=48", "train.epochs=2",
         "deterministic=true", "train.num_workers=0", "train.log_every=1", "method.warmup_epochs=1",
         "method.n_pos=10", "eval.untrained_baseline=false"]
PERIODIC = ("train.checkpoint_every_steps=2", "train.keep_checkpoints=2")


def _cmd(run: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "launchers/submit.py"), *SMALL, *overrides, f"out_dir={run}"]


def _launch(run: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=env)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run that also saved every 2 steps, keeping 2 checkpoints (`PERIODIC`)."""
    run = tmp_path_factory.mktemp("fin") / "run"
    proc = _launch(run, *PERIODIC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run.parent / "launch.out").write_text(proc.stdout + proc.stderr)
    return run


# -- 1. a finished command run again, and a periodic save on the last step ---------------------------------
def _tree(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


def test_rerun_of_finished_command_changes_nothing_and_says_so(finished_run: Path, tmp_path: Path) -> None:
    before = _tree(finished_run)
    for _ in range(2):  # the third run retrained from step 0; later ones rewrote results.json's times
        proc = _launch(finished_run, *PERIODIC)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == (f"{finished_run} already finished this command (step 16; results in "
                                       "results.json): nothing to do; change a setting such as train.epochs to "
                                       "continue it, or pass a new out_dir= for a new run")
        assert proc.stderr == ""
    assert _tree(finished_run) == before  # every file, bytes and modification time
    assert checkpoint.latest(finished_run / "checkpoints").name == "step_16"
    assert _steps(finished_run) == list(range(1, 17))
    export = subprocess.run([sys.executable, str(ROOT / "tools/export_backbone.py"), str(finished_run), "--out",
                             str(tmp_path / "b.pth")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0 and "from step_16" in export.stdout, export.stderr


def test_a_finished_run_missing_a_requested_result_is_not_done(tmp_path: Path) -> None:
    """Stopped during the linear probe (results.json without it), or run again with other settings: the
    command goes on; the finished run with every result and the same settings is done."""
    from invprop.jobs import rundir

    cfg = _cfg("data=synthetic", "eval.protocols=[knn,linear]", f"out_dir={tmp_path}")
    rundir.prepare(cfg, tmp_path)
    (tmp_path / "FINISHED").write_text(json.dumps({"step": 8}))
    (tmp_path / "results.json").write_text(json.dumps({"knn_top1": 0.5}))
    assert rundir.finished_unchanged(cfg, tmp_path) is None
    (tmp_path / "results.json").write_text(json.dumps({"knn_top1": 0.5, "eval_linear_checkpoint": "step_8"}))
    assert rundir.finished_unchanged(cfg, tmp_path) == 8
    assert rundir.finished_unchanged(_cfg("data=synthetic", "eval.protocols=[knn,linear]", "train.epochs=3",
                                          f"out_dir={tmp_path}"), tmp_path) is None
    (tmp_path / "FINISHED").unlink()
    assert rundir.finished_unchanged(cfg, tmp_path) is None


def test_periodic_save_on_the_last_step(finished_run: Path) -> None:
    assert [d.name for d in checkpoint.step_dirs(finished_run / "checkpoints")] == ["step_16", "step_14"]


# -- 2/3. what a resume cannot change is refused before anything is written ---------------------------------
def test_resume_refuses_fixed_changes_and_leaves_the_run_alone(finished_run: Path) -> None:
    """One launch for four kinds of fixed key: the refusal names every one it finds, so each is checked."""
    files = {p: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    proc = _launch(finished_run, "model=resnet18_cifar", "model.embedding_dim=64", "data.subset=240",
                   "train.batch_size=64", "method.tau=0.3", "train.epochs=3")  # batch size: the hang
    assert proc.returncode == 2
    _no_traceback(proc)
    line = proc.stdout.strip()
    assert "\n" not in line and "out_dir=" in line and "train.epochs" not in line, line
    for named in ("model.arch", "data.subset", "train.batch_size", "method.tau"):
        assert named in line, (named, line)
    assert "cannot continue: " in line and "model.embedding_dim=64 (run has 128)" in line
    assert {p: p.read_bytes() for p in finished_run.iterdir() if p.is_file()} == files  # config.yaml unchanged


@pytest.mark.slow
def test_hand_edited_batch_size_is_refused_not_a_hang(tmp_path: Path) -> None:
    """Below the launcher's check (a config.yaml edited by hand): the checkpoint's own identity refuses the
    changed global batch (a checkpoint at batch 7 of 8 could not continue with 4 batches per epoch) instead of
    looping on an empty epoch."""
    run = tmp_path / "run"
    assert _launch(run, "train.epochs=1", "train.checkpoint_every_steps=7").returncode == 0
    shutil.rmtree(run / "checkpoints" / "step_8")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("batch_size: 48", "batch_size: 96"))
    code = ("import sys\nfrom invprop.jobs.pretrain import pretrain\ntry:\n    pretrain(sys.argv[1])\n"
            "except ValueError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "cannot continue: train.batch_size=96 (run has 48)" in proc.stdout, proc.stderr


def _signal_once_training(proc: subprocess.Popen, run: Path, sig: signal.Signals, group: bool = False) -> None:
    """Send `sig` once the run has logged a step (its handlers are installed by then), to the launcher or (as a
    terminal's Ctrl-C) to its whole process group. The runs here are far longer than the wait, so the signal
    always lands mid-run; where exactly is left open and not asserted."""
    deadline = time.monotonic() + 200
    while not ((run / "metrics.jsonl").exists() and _steps(run)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.02)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)


@pytest.mark.slow
def test_sigkill_before_first_checkpoint_then_rerun_has_no_repeated_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # 40 epochs: it cannot reach its final (first) checkpoint before the kill
    proc = subprocess.Popen(_cmd(run, "train.epochs=40"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _signal_once_training(proc, run, signal.SIGKILL)
    finally:
        proc.wait()
    assert not checkpoint.step_dirs(run / "checkpoints")
    done = _launch(run)  # a fresh start (no checkpoint), now 2 epochs
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" not in done.stderr
    assert _steps(run) == list(range(1, 17))  # the killed attempt's lines are gone


# -- 4. local ranks: the launcher forwards stop signals and only FINISHED means finished ---------------------
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "gpus", "group"), [(signal.SIGUSR2, 2, False), (signal.SIGTERM, 2, False),
                                                    (signal.SIGINT, 1, True), (signal.SIGINT, 2, True)],
                         ids=["USR2", "TERM", "ctrl-c", "ctrl-c-2-ranks"])
def test_signal_to_local_launcher_stops_its_ranks_with_a_checkpoint(tmp_path: Path, sig: signal.Signals, gpus: int,
                                                                    group: bool) -> None:
    """A real signal from outside, to the launcher (or, as a terminal's Ctrl-C, to its whole process group, ranks
    included): a committed checkpoint at the next step, exit 3 with "stopped at step n", no traceback. The point
    is the forwarding, so only what holds at any step is asserted (the step-exact stop and resume:
    train.stop_at_step in test_train and test_preemption_slurm)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, f"gpus={gpus}", "train.epochs=40"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)
    try:
        _signal_once_training(proc, run, sig, group=group)
        out, err = proc.communicate(timeout=200)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, (out + err)[-3000:]
    _no_traceback(subprocess.CompletedProcess([], 3, out, err))
    stopped = checkpoint.step_of(checkpoint.latest(run / "checkpoints"))
    assert f"stopped at step {stopped} with a committed checkpoint" in out and "run the same command again" in out
    assert _steps(run) == list(range(1, stopped + 1)) and not (run / "FINISHED").exists()
    if sig == signal.SIGUSR2:
        epochs = stopped // 8 + 1  # just to the end of the epoch it stopped in (8 steps per epoch)
        again = _launch(run, "gpus=2", f"train.epochs={epochs}")
        assert again.returncode == 0, again.stderr[-3000:]
        assert (run / "FINISHED").exists() and _steps(run) == list(range(1, 8 * epochs + 1))


# -- 3. one line for bad input ------------------------------------------------------------------------------
def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (gzipped when the name ends in .gz) of a uint8 array."""
    data = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped folder with 100 training and 20 test images."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return tmp_path


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(_cfg(*overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "label_count", "label_200", "missing"])
def test_damaged_idx_files_are_named_up_front(idx_root: Path, damage: str) -> None:
    images, labels = idx_root / "train-images-idx3-ubyte.gz", idx_root / "train-labels-idx1-ubyte.gz"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "garbage":
        images.write_bytes(os.urandom(images.stat().st_size))
    elif damage == "label_count":
        write_idx(labels, np.zeros(99))
    elif damage == "label_200":
        write_idx(labels, np.r_[np.zeros(50), 200, np.zeros(49)])
    else:
        labels.unlink()
    message = _error("data.format=torchvision", "data.subset=0", "train.batch_size=50", "method.k=4",
                     f"data.root={idx_root}", f"out_dir={idx_root / 'run'}")
    assert message.startswith("data.root")
    named = labels.name if damage in ("label_count", "label_200") else images.name
    assert (named if damage != "missing" else "no train-labels-idx1-ubyte[.gz]") in message
    if damage == "label_200":
        assert "label 200 at index 50" in message


def test_small_idx_folder_validates_and_bounds_the_subset(idx_root: Path) -> None:
    good = ["data.format=torchvision", f"data.root={idx_root}", f"out_dir={idx_root / 'run'}", "train.batch_size=50"]
    validate(_cfg(*good, "data.subset=0"))
    assert _error(*good, "data.subset=101").startswith("data.subset=101 is larger than the 100 training images")
    assert _error(*good, "data.subset=0", "train.batch_size=120").startswith("train.batch_size=120")


def test_out_dir_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert _error("data=synthetic", f"out_dir={tmp_path / 'f' / 'run'}").startswith(
        f"out_dir={tmp_path / 'f' / 'run'} is below the file")


def test_unwritable_out_dir_is_one_line(tmp_path: Path) -> None:
    """/proc accepts no new folders, even from root (os.access cannot tell)."""
    proc = _launch(Path("/proc/invprop-run"))
    assert proc.returncode == 2
    _no_traceback(proc)
    assert proc.stdout.strip().startswith("config error: out_dir=/proc/invprop-run") and "\n" not in proc.stdout.strip()


def test_failure_during_the_run_is_one_line(tmp_path: Path) -> None:
    """An error no check foresees (here: checkpoints/ is a file) ends with one line; the traceback on demand."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    proc = _launch(run, "train.epochs=1")
    assert proc.returncode == 1
    _no_traceback(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "checkpoints" in last and "INVPROP_VERBOSE=1" in last
    verbose = _launch(run, "train.epochs=1", env={**os.environ, "INVPROP_VERBOSE": "1"})
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_export_refuses_existing_destination_and_leaves_no_tmp(finished_run: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import export_backbone
    finally:
        sys.path.remove(str(ROOT / "tools"))
    folder = tmp_path / "exists"
    folder.mkdir()
    assert export_backbone.main([str(finished_run), "--out", str(folder)]) == 2
    assert list(folder.iterdir()) == []
    below_file = tmp_path / "file"
    below_file.write_text("x")
    assert export_backbone.main([str(finished_run), "--out", str(below_file / "b.pth")]) == 2
    assert export_backbone.main([str(finished_run), "--out", "/proc/b.pth"]) == 2
    assert not list(Path("/proc").glob(".b.pth*")) and sorted(p.name for p in tmp_path.iterdir()) == ["exists",
                                                                                                       "file"]


def test_huge_image_size_is_one_line_naming_the_bound() -> None:
    message = _error("data=synthetic", "data.image_size=100000")
    assert message.startswith("data.image_size=100000 is larger than 2048 pixels per side; use at most 2048")


def test_export_features_to_an_unwritable_place_is_one_line(finished_run: Path, tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import export_features
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert export_features.main([str(finished_run), "--out", "/proc/feats.npz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out /proc/feats.npz: cannot write there (") and "\n" not in err
    assert export_features.main([str(finished_run), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {tmp_path} is a folder; give a file name such as "
                                               f"{tmp_path / 'features.npz'}")
    assert list(tmp_path.iterdir()) == []


def test_more_ranks_than_the_machine_has_is_refused_unless_forced() -> None:
    from invprop.config import machine_slots

    slots, what = machine_slots()  # CPU cores here (no GPU), GPUs on a GPU machine
    ranks = slots + 1
    many = ["data=synthetic", "data.n_train=2000", f"gpus={ranks}", f"train.batch_size={32 * ranks}"]
    assert _error(*many) == (f"gpus={ranks} starts {ranks} ranks on this machine, which has {what}; use "
                             f"gpus={slots} or fewer, or set cluster.allow_oversubscribe=true to run them anyway")
    validate(_cfg(*many, "cluster.allow_oversubscribe=true"))
    validate(_cfg(*many[:2], f"gpus={slots}", f"train.batch_size={32 * slots}"))
    slurm = ["data=synthetic", "cluster=slurm", "nodes=2", "gpus=4", "train.batch_size=256"]
    assert _error(*slurm, "cluster.gpus_per_node=2").startswith(
        "gpus=4 ranks per node is more than the cluster.gpus_per_node=2 GPUs each node is given")
    validate(_cfg(*slurm, "cluster.gpus_per_node=4"))


def test_cpu_core_count_is_the_affinity_not_the_machine() -> None:
    """A process limited to one core (taskset, a SLURM cgroup) may not start two ranks."""
    code = ("import os, sys; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from invprop.config import machine_slots; print(machine_slots())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip() == "(1, 'no GPU and 1 usable CPU core(s)')", proc.stderr[-2000:]


def test_time_estimate_after_the_first_window() -> None:
    from invprop.train.estimate import duration, steps_estimate

    assert [duration(s) for s in (40, 89.6, 600, 5399, 12240, 200000)] == ["40 s", "90 s", "10 min", "90 min",
                                                                          "3.4 h", "2.3 days"]
    assert steps_estimate(10, 25.0, 10, 10010, 1000) == (
        "10010 steps (1000 per epoch x 10 epochs), 10000 to go: about 6.9 h of training at 2.5 s per step (the pace "
        "of the first 10 steps; evaluation not included)")
    assert steps_estimate(1, 0.5, 5, 16, 8).startswith("16 steps (8 per epoch x 2 epochs), 11 to go: about 6 s ")
    assert steps_estimate(4, 1.0, 16, 16, 8) is None  # the first window was the last


def test_the_launch_prints_the_estimate_once(finished_run: Path) -> None:
    lines = [line for line in (finished_run.parent / "launch.out").read_text().splitlines() if "to go: about" in line]
    assert len(lines) == 1 and lines[0].startswith("16 steps (8 per epoch x 2 epochs), 15 to go: about "), lines


def test_reliability_check_cases_that_compose_badly_or_could_run_code(tmp_path: Path, capsys) -> None:
    """tools/reliability_check.py: values that do not compose are refused as the launcher refuses them, and the
    malicious pickles (which would create a file when loaded) are refused without running."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import reliability_check
    finally:
        sys.path.remove(str(ROOT / "tools"))
    code = reliability_check.main(["--work", str(tmp_path), "--only", "7 seed=abc", "--only", "7 train.lr=abc",
                                   "--only", "malicious CIFAR", "--only", "another method.tau"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "tried 4 / clean 4 / traceback 0 / silent 0 / lost 0" and code == 0, lines
    assert not (tmp_path / "pickle_ran").exists()
