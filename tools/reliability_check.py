"""`python tools/reliability_check.py [--work DIR]`: issue 19's bad inputs and faults, tried again, counted.

Each case runs the launcher's own entry (`invprop.jobs.submit.main`, in this process, on tiny synthetic runs or
a tiny IDX folder) or the export tool, and is classed as
  clean     refused with one line naming the field or file (config error before any work, or an error line),
            or the fault was absorbed as designed (checkpoint still valid, change recorded, fallback warned);
  traceback an exception escaped;
  silent    an invalid value was accepted;
  lost      a checkpoint, config.yaml or metrics.jsonl ended up wrong.
Signals to local ranks and a SIGKILL mid-run need real processes: tests/test_reliability.py covers them.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from invprop import checkpoint  # noqa: E402
from invprop.jobs import submit  # noqa: E402

SMALL = ["data=synthetic", "data.n_train=96", "data.n_test=64", "train.batch_size=24", "train.epochs=2",
         "train.num_workers=0", "train.log_every=1", "method.warmup_epochs=1", "method.n_pos=10",
         "eval.untrained_baseline=false", "eval.knn_k=20"]


def launch(out: Path, *overrides: str, small: bool = True) -> tuple[int | None, str]:
    """(exit status, everything printed) of the launcher's main; None when an exception escaped."""
    buffer = io.StringIO()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[*(SMALL if small else []), *overrides, f"out_dir={out}"])
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            code = submit.main(cfg)
        except Exception as exc:  # noqa: BLE001 - that is what is being counted
            return None, f"{type(exc).__name__}: {exc}"
    return code, buffer.getvalue()


def steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def refused(out: Path, *overrides: str, small: bool = True) -> str:
    code, text = launch(out, *overrides, small=small)
    if code is None:
        return "traceback"
    if code == 0:
        return "silent"
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return "clean" if code == 2 and last.startswith("config error:") and len(text.strip().splitlines()) == 1 \
        else "traceback"


def write_idx(path: Path, array: np.ndarray) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(data + array.astype(np.uint8).tobytes()))


def idx_folder(where: Path, damage: str) -> Path:
    rng = np.random.default_rng(0)
    where.mkdir(parents=True)
    for prefix, n in (("train", 100), ("t10k", 20)):
        write_idx(where / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(where / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    images, labels = where / "train-images-idx3-ubyte.gz", where / "train-labels-idx1-ubyte.gz"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "garbage":
        images.write_bytes(os.urandom(images.stat().st_size))
    elif damage == "label count":
        write_idx(labels, np.zeros(99))
    elif damage == "label 200":
        write_idx(labels, np.r_[np.zeros(50), 200, np.zeros(49)])
    return where


def cases(work: Path) -> list[tuple[str, Callable[[], str]]]:
    fin = work / "finished"
    fresh = iter(range(1000))

    def new() -> Path:
        return work / f"r{next(fresh)}"

    def finished_run() -> Path:
        if not (fin / "FINISHED").exists():
            code, text = launch(fin)
            assert code == 0, text[-2000:]
        return fin

    def rerun_finished() -> str:
        run = finished_run()
        for _ in range(2):
            if launch(run)[0] != 0:
                return "traceback"
        ok = checkpoint.latest(run / "checkpoints").name == "step_8" and steps(run) == list(range(1, 9))
        return "clean" if ok else "lost"

    def periodic_on_last_step() -> str:
        run = new()
        if launch(run, "train.checkpoint_every_steps=2")[0] != 0:
            return "traceback"
        return "clean" if checkpoint.latest(run / "checkpoints").name == "step_8" else "lost"

    def resume_changed(*overrides: str) -> Callable[[], str]:
        def attempt() -> str:
            run = new()
            shutil.copytree(finished_run(), run)
            (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(fin), str(run)))
            before = (run / "config.yaml").read_bytes()
            found = refused(run, *overrides)
            return "lost" if found == "clean" and (run / "config.yaml").read_bytes() != before else found
        return attempt

    def resume_recorded(*overrides: str) -> Callable[[], str]:
        def attempt() -> str:
            run = new()
            shutil.copytree(finished_run(), run)
            (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(fin), str(run)))
            code, _ = launch(run, *overrides)
            if code is None:
                return "traceback"
            history = run / "config_history.json"
            return "clean" if code == 0 and history.exists() and steps(run) == sorted(set(steps(run))) else "silent"
        return attempt

    def corrupt(name: str, content: Callable[[Path], bytes]) -> Callable[[], str]:
        def attempt() -> str:
            run = new()
            root = run / "checkpoints"
            code, _ = launch(run, "train.checkpoint_every_steps=4")
            assert code == 0
            target = root / "step_8" / name
            size = target.stat().st_size
            target.write_bytes((content(target) + b"\0" * size)[:size])
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                found = checkpoint.latest(root)
            warned = len(err.getvalue().splitlines()) == 1 and str(target) in err.getvalue()
            return "clean" if found is not None and found.name == "step_4" and warned else "lost"
        return attempt

    def malicious(_: Path) -> bytes:
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("true",))
        return pickle.dumps(Evil())

    def idx(damage: str) -> Callable[[], str]:
        def attempt() -> str:
            root = idx_folder(new(), damage)
            return refused(new(), f"data.root={root}", "data.format=torchvision", "data.subset=0",
                           "train.batch_size=50", small=False)
        return attempt

    def export(dest: Callable[[], Path]) -> Callable[[], str]:
        def attempt() -> str:
            sys.path.insert(0, str(ROOT / "tools"))
            import export_backbone

            out = dest()
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = export_backbone.main([str(finished_run()), "--out", str(out)])
                except Exception:  # noqa: BLE001
                    return "traceback"
            left = [p for p in out.parent.glob(f".{out.name}*")] if out.parent.is_dir() else []
            return "clean" if code == 2 and len(err.getvalue().strip().splitlines()) == 1 and not left else "lost"
        return attempt

    def existing_folder() -> Path:
        folder = new()
        folder.mkdir()
        return folder

    below_file = work / "a_file"
    below_file.write_text("x")
    return [
        ("1 rerun of a finished command (checkpoint stays valid)", rerun_finished),
        ("1 checkpoint_every_steps=2 saves on the last step", periodic_on_last_step),
        ("2 train.keep_checkpoints=0", lambda: refused(new(), "train.keep_checkpoints=0")),
        ("3 resume with model=resnet18_cifar", resume_changed("model=resnet18_cifar")),
        ("3 resume with another data.subset", resume_changed("data.subset=48")),
        ("3 resume with another method.tau", resume_changed("method.tau=0.1")),
        ("3 resume with more epochs (recorded)", resume_recorded("train.epochs=3")),
        ("3 resume with another train.lr (recorded)", resume_recorded("train.lr=0.05")),
        ("4 resume with another train.batch_size", resume_changed("train.batch_size=32")),
        ("6 same-size garbage state.pt", corrupt("state.pt", lambda p: os.urandom(64))),
        ("6 same-size malicious pickle state.pt", corrupt("state.pt", malicious)),
        ("6 same-size garbage bank shard", corrupt("bank.0-of-1", lambda p: os.urandom(64))),
        ("7 data.root=/nonexistent", lambda: refused(new(), "data.root=/nonexistent", small=False)),
        ("7 seed=abc", lambda: refused(new(), "seed=abc")),
        ("7 train.lr=abc", lambda: refused(new(), "train.lr=abc")),
        ("7 model.embedding_dim=0", lambda: refused(new(), "model.embedding_dim=0")),
        ("7 train.log_every=0", lambda: refused(new(), "train.log_every=0")),
        ("7 data.image_size=16 (Fashion-MNIST, pad)", lambda: refused(new(), "data.image_size=16", small=False)),
        ("7 data.resize_mode=foo", lambda: refused(new(), "data.resize_mode=foo")),
        ("7 out_dir not writable (/proc)", lambda: refused(Path("/proc/invprop-run"))),
        ("7 out_dir below a file", lambda: refused(below_file / "run")),
        ("7 truncated .gz IDX", idx("truncated")),
        ("7 garbage .gz IDX", idx("garbage")),
        ("7 wrong label count", idx("label count")),
        ("7 a label of 200", idx("label 200")),
        ("7 export to an existing folder", export(existing_folder)),
        ("7 export to a read-only place", export(lambda: Path("/proc/backbone.pth"))),
        ("8 data.subset=70000", lambda: refused(new(), "data.subset=70000", small=False)),
        ("8 data.format=foo", lambda: refused(new(), "data.format=foo")),
        ("8 data.augment.crop_scale=[2,1]", lambda: refused(new(), "data.augment.crop_scale=[2,1]")),
        ("8 train.checkpoint_every_steps=-1", lambda: refused(new(), "train.checkpoint_every_steps=-1")),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="invprop-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {"clean": 0, "traceback": 0, "silent": 0, "lost": 0}
    for name, attempt in cases(work):
        try:
            outcome = attempt()
        except Exception as exc:  # noqa: BLE001 - a case that crashed the checker itself
            outcome = "traceback"
            name += f" [{type(exc).__name__}: {exc}]"
        counts[outcome] += 1
        print(f"{outcome:9s} {name}", flush=True)
    tried = sum(counts.values())
    print(f"tried {tried} / clean {counts['clean']} / traceback {counts['traceback']} / silent {counts['silent']} "
          f"/ lost {counts['lost']}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if counts["clean"] == tried else 1


if __name__ == "__main__":
    sys.exit(main())
