"""`python tools/reliability_check.py [--work DIR] [--only TEXT ...]`: issues 19's and 30's bad inputs and faults,
tried again, counted.

Each case runs the launcher's own steps (its command-line check, then `invprop.jobs.submit.main` or `run`, in
this process, on tiny synthetic runs, a tiny IDX, CIFAR or image folder), the .beton cache or an export tool,
and is classed as
  clean     refused with one line naming the field or file (config error before any work, or an error line),
            or the fault was absorbed as designed (checkpoint still valid, change recorded, fallback warned);
  traceback an exception escaped;
  silent    an invalid value was accepted;
  lost      a checkpoint, config.yaml or metrics.jsonl ended up wrong.
Signals to local ranks, Ctrl-C and a SIGKILL mid-run need real processes: tests/test_reliability.py covers them.
`--only TEXT` (repeatable) runs the cases whose name contains one of them.
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
from omegaconf import OmegaConf  # noqa: E402

from invprop import checkpoint  # noqa: E402
from invprop.config import ConfigError, machine_slots, validate  # noqa: E402
from invprop.jobs import submit  # noqa: E402
from invprop.jobs.sweep import check_command_line  # noqa: E402

SMALL = ["data=synthetic", "data.n_train=96", "data.n_test=64", "train.batch_size=24", "train.epochs=2",
         "train.num_workers=0", "train.log_every=1", "method.warmup_epochs=1", "method.n_pos=10",
         "eval.untrained_baseline=false", "eval.knn_k=20"]


def compose_cfg(out: Path, overrides: list[str], small: bool = True):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=[*(SMALL if small else []), *overrides, f"out_dir={out}"])


def launch(out: Path, *overrides: str, small: bool = True, edit: Callable | None = None,
           entry: str = "main") -> tuple[int | None, str]:
    """(exit status, everything printed) of the launcher: its command-line check (launchers/submit.py turns a
    value that does not compose into one line there), then `submit.main` (or `submit.run`, the top level that
    prints an error during the run as one line); None when an exception escaped. `edit` changes the composed
    config (values no command line can spell, such as a newline)."""
    buffer = io.StringIO()
    argv = [*(SMALL if small else []), *overrides, f"out_dir={out}"]
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            if edit is None:
                problems = check_command_line(argv, ROOT / "configs", check_values=False)
                if problems:
                    print(f"config error: {problems[0]}")
                    return 2, buffer.getvalue()
            cfg = compose_cfg(out, list(overrides), small)
            if edit is not None:
                edit(cfg)
            if entry == "run":
                try:
                    submit.run(cfg)
                    code = 0
                except SystemExit as exc:
                    code = int(exc.code or 0)
            else:
                code = submit.main(cfg)
        except Exception as exc:  # noqa: BLE001 - that is what is being counted
            return None, f"{type(exc).__name__}: {exc}"
    return code, buffer.getvalue()


def steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def refused(out: Path, *overrides: str, small: bool = True, names: str = "", edit: Callable | None = None) -> str:
    """Clean: exit 2 with one `config error:` line (naming `names` when given) and nothing written to `out`."""
    existed = out.exists()
    code, text = launch(out, *overrides, small=small, edit=edit)
    if code is None:
        return "traceback"
    if code == 0:
        return "silent"
    lines = text.strip().splitlines()
    one = code == 2 and len(lines) == 1 and lines[0].startswith("config error:") and names in lines[0]
    if one and not existed and out.exists():
        return "lost"  # a refused command created its run directory
    return "clean" if one else "traceback"


def failed_one_line(out: Path, *overrides: str, small: bool = True, names: str = "") -> str:
    """Clean: the launcher's top level ends the run with exit 1 and one `error:` line naming `names`."""
    code, text = launch(out, *overrides, small=small, entry="run")
    if code is None or "Traceback" in text:
        return "traceback"
    if code == 0:
        return "silent"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    ok = code == 1 and len(errors) == 1 and names in errors[0] and not (out / "FINISHED").exists()
    return "clean" if ok else "traceback"


def tree(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


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


def image_folder(where: Path, bad: str = "") -> Path:
    """root/{train,val}/{a,b}/img_<i>.jpg (6 and 2 a class, 40 px); `bad` spoils train/a/img_3.jpg ("zero bytes",
    "text", "bomb": a valid JPEG whose header claims 65000 x 65000 pixels), adds an "empty class" folder, or a
    "loop": a link to the class folder's parent inside it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, name in enumerate("ab"):
            (where / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (rng.integers(0, 60, (40, 40, 3)) + 150 * c).astype(np.uint8)
                Image.fromarray(pixels).save(where / split / name / f"img_{i}.jpg", quality=90)
    target = where / "train" / "a" / "img_3.jpg"
    if bad == "zero bytes":
        target.write_bytes(b"")
    elif bad == "text":
        target.write_text("not a picture\n")
    elif bad == "bomb":
        data = bytearray(target.read_bytes())
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
        target.write_bytes(bytes(data))
    elif bad == "empty class":
        (where / "train" / "c").mkdir()
    elif bad == "loop":
        (where / "train" / "a" / "loop").symlink_to(where / "train")
    return where


def cifar_folder(where: Path, damage: str, malicious: bytes) -> Path:
    """A CIFAR-10 python release of 5 x 20 training and 20 test images; data_batch_1 spoiled by `damage`."""
    import pickle

    rng = np.random.default_rng(0)
    folder = where / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(20)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    first = folder / "data_batch_1"
    if damage == "malicious":
        first.write_bytes(malicious)
    elif damage == "truncated":
        first.write_bytes(first.read_bytes()[:1000])
    elif damage == "garbage":
        first.write_bytes(os.urandom(first.stat().st_size))
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
            (work / "finished.out").write_text(text)
        return fin

    def rerun_finished() -> str:
        run = finished_run()
        before = tree(run)
        for _ in range(2):
            code, text = launch(run)
            if code != 0:
                return "traceback"
            if len(text.strip().splitlines()) != 1 or "already finished this command (step 8;" not in text:
                return "silent"
        ok = tree(run) == before and checkpoint.latest(run / "checkpoints").name == "step_8"
        return "clean" if ok and steps(run) == list(range(1, 9)) else "lost"

    def estimate_once() -> str:
        finished_run()
        lines = [line for line in (work / "finished.out").read_text().splitlines() if "to go: about" in line]
        return "clean" if len(lines) == 1 and lines[0].startswith("8 steps (4 per epoch x 2 epochs)") else "silent"

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

    marker = work / "pickle_ran"

    def malicious(_: Path) -> bytes:
        """A pickle that creates `marker` when loaded: the case is clean only if the file never appears."""
        import pickle

        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))
        return pickle.dumps(Evil())

    def no_code_ran(attempt: Callable[[], str]) -> Callable[[], str]:
        def checked() -> str:
            found = attempt()
            return "lost" if marker.exists() else found
        return checked

    def idx(damage: str) -> Callable[[], str]:
        def attempt() -> str:
            root = idx_folder(new(), damage)
            return refused(new(), f"data.root={root}", "data.format=torchvision", "data.subset=0",
                           "train.batch_size=50", small=False)
        return attempt

    def export(dest: Callable[[], Path], tool: str = "export_backbone") -> Callable[[], str]:
        def attempt() -> str:
            sys.path.insert(0, str(ROOT / "tools"))
            module = __import__(tool)

            out = dest()
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = module.main([str(finished_run()), "--out", str(out)])
                except Exception:  # noqa: BLE001
                    return "traceback"
            left = [p for p in out.parent.glob(f".{out.name}*")] if out.parent.is_dir() else []
            return "clean" if code == 2 and len(err.getvalue().strip().splitlines()) == 1 and not left else "lost"
        return attempt

    def existing_folder() -> Path:
        folder = new()
        folder.mkdir()
        return folder

    # -- issue 30 ---------------------------------------------------------------------------------------
    def folder(bad: str = "") -> Path:
        root = image_folder(new(), bad)
        return root

    def folder_args(root: Path, fmt: str) -> list[str]:
        return ["data=folder", f"data.root={root}", f"data.format={fmt}", "data.image_size=32",
                f"data.beton_dir={work / 'betons'}", "data.beton_max_resolution=48", "train.batch_size=4",
                "train.allow_small_rank_batch=true", "train.num_workers=0", "data.eval_workers=0", "method.k=2",
                "method.n_pos=2", "method.n_background=8", "eval.untrained_baseline=false", "train.epochs=1"]

    def bad_image(bad: str, fmt: str) -> Callable[[], str]:
        def attempt() -> str:
            root = folder(bad)
            return failed_one_line(new(), *folder_args(root, fmt), small=False,
                                   names=f"{root / 'train' / 'a' / 'img_3.jpg'} (")
        return attempt

    def symlink_loop() -> str:
        from invprop.data.folder import scan_split

        root = folder("loop")
        return "clean" if len(scan_split(str(root), "train")[1]) == 12 else "silent"

    def cifar(damage: str) -> Callable[[], str]:
        def attempt() -> str:
            root = cifar_folder(new(), damage, malicious(Path()))
            return refused(new(), "data=cifar10", f"data.root={root}", "train.batch_size=20", "data.subset=0",
                           "method.k=4", "method.n_pos=4", small=False, names="data_batch_1")
        return attempt

    def beton(damage: str) -> Callable[[], str]:
        def attempt() -> str:
            from invprop.config import group_section
            from invprop.data.beton_cache import ensure_beton, source_files
            from invprop.data.beton_check import fingerprint, problem, record_path

            root = folder()
            cfg = group_section("data", "folder", root=str(root), image_size=32, beton_max_resolution=48)
            where = new()
            path = ensure_beton(cfg, "train", where, num_workers=1, progress=False)
            size = path.stat().st_size
            if damage == "source edited":
                image = root / "train" / "b" / "img_1.jpg"
                image.write_bytes(image.read_bytes() + b"\0")
            elif damage == "overwritten":
                with open(path, "r+b") as fh:
                    fh.seek(size // 2)
                    fh.write(b"\xff" * 64)
            elif damage == "truncated":
                os.truncate(path, size // 2)
            else:
                record_path(path).unlink()
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                again = ensure_beton(cfg, "train", where, num_workers=1, progress=False)
            lines = err.getvalue().strip().splitlines()
            ok = again == path and problem(path, fingerprint(source_files(cfg, "train"))) is None
            return "clean" if ok and len(lines) == 1 and lines[0].startswith(f"rewriting {path}: ") else "silent"
        return attempt

    def held_lock() -> str:
        from invprop.jobs.runlock import RunLock

        run = new()
        with RunLock(run).acquire("launch"):
            return refused(run, names="in use by another launch")

    def forced_oversubscribe() -> str:
        ranks = machine_slots()[0] + 1
        cfg = compose_cfg(new(), [f"gpus={ranks}", f"train.batch_size={16 * ranks}", f"data.n_train={96 * ranks}",
                                  "cluster.allow_oversubscribe=true"])
        try:
            validate(cfg)
        except ConfigError:
            return "traceback"
        return "clean"

    def setting(key: str, value: str) -> Callable:
        def edit(cfg) -> None:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        return edit

    slots = machine_slots()[0]
    many = [f"gpus={slots + 1}", f"train.batch_size={16 * (slots + 1)}", f"data.n_train={96 * (slots + 1)}"]
    below_file = work / "a_file"
    below_file.write_text("x")
    issue30 = [
        ("30 data.image_size=100000", lambda: refused(new(), "data.image_size=100000", names="at most 2048")),
        ("30 data.image_size=4", lambda: refused(new(), "data.image_size=4", names="data.image_size")),
        ("30 seed=2^32", lambda: refused(new(), "seed=4294967296", names="seed")),
        ("30 seed=-1", lambda: refused(new(), "seed=-1", names="seed")),
        ("30 train.lr=nan", lambda: refused(new(), "train.lr=nan", names="train.lr")),
        ("30 train.lr=inf", lambda: refused(new(), "train.lr=inf", names="train.lr")),
        ("30 method.tau=nan", lambda: refused(new(), "method.tau=nan", names="method.tau")),
        ("30 method.tau=0", lambda: refused(new(), "method.tau=0", names="method.tau")),
        ("30 train.weight_decay=-inf", lambda: refused(new(), "train.weight_decay=-inf", names="train.weight_decay")),
        ("30 train.momentum=nan", lambda: refused(new(), "train.momentum=nan", names="train.momentum")),
        ("30 method.lambda_inv=nan", lambda: refused(new(), "method.lambda_inv=nan", names="method.lambda_inv")),
        ("30 data.augment.hue=2", lambda: refused(new(), "data.augment.hue=2", names="data.augment.hue")),
        ("30 data.augment.crop_scale=[0,1]", lambda: refused(new(), "data.augment.crop_scale=[0,1]",
                                                              names="data.augment.crop_scale")),
        ("30 data.subset=-1", lambda: refused(new(), "data.subset=-1", names="data.subset")),
        ("30 train.epochs=0", lambda: refused(new(), "train.epochs=0", names="train.epochs")),
        ("30 train.batch_size=0", lambda: refused(new(), "train.batch_size=0", names="train.batch_size")),
        ("30 method.k=0", lambda: refused(new(), "method.k=0", names="method.k")),
        ("30 method.l=0", lambda: refused(new(), "method.l=0", names="method.l")),
        ("30 eval.protocols=[foo]", lambda: refused(new(), "eval.protocols=[foo]", names="eval.protocols")),
        ("30 cluster.run_timeout_h=0", lambda: refused(new(), "cluster.run_timeout_h=0", names="run_timeout_h")),
        ("30 train.dist_timeout_s=0", lambda: refused(new(), "train.dist_timeout_s=0", names="dist_timeout_s")),
        ("30 nodes=2 with cluster=local", lambda: refused(new(), "nodes=2", names="cluster=local")),
        (f"30 gpus={slots + 1} on {slots} slots", lambda: refused(new(), *many,
                                                                  names="cluster.allow_oversubscribe=true")),
        ("30 gpus=4 over cluster.gpus_per_node=2", lambda: refused(
            new(), "cluster=slurm", "nodes=2", "gpus=4", "cluster.gpus_per_node=2", "train.batch_size=64",
            "train.allow_small_rank_batch=true", names="cluster.gpus_per_node=2")),
        ("30 forced oversubscription accepted", forced_oversubscribe),
        ("30 newline in cluster.partition", lambda: refused(new(), "cluster=slurm", names="cluster.partition",
                                                            edit=setting("cluster.partition", "gpu\n#SBATCH -x"))),
        ("30 newline in an additional parameter", lambda: refused(
            new(), "cluster=slurm", names="cluster.additional_parameters",
            edit=setting("cluster.additional_parameters.mail", "a\nb"))),
        ("30 newline in out_dir", lambda: refused(new(), names="out_dir", edit=setting("out_dir",
                                                                                       str(work / "a\nb")))),
        ("30 Rich markup in out_dir printed as written", lambda: refused(
            new(), names="[bold]r[/bold]", edit=setting("out_dir", str(below_file / "[bold]r[/bold]")))),
        ("30 a run directory held by another launch", held_lock),
        ("30 a class folder without images", lambda: refused(new(), *folder_args(folder("empty class"), "ffcv"),
                                                              small=False, names="has no images")),
        ("30 a symlink loop in a class folder (not entered)", symlink_loop),
        ("30 zero-byte .jpg, data.format=ffcv", bad_image("zero bytes", "ffcv")),
        ("30 text .jpg, data.format=ffcv", bad_image("text", "ffcv")),
        ("30 decompression-bomb .jpg, data.format=ffcv", bad_image("bomb", "ffcv")),
        ("30 zero-byte .jpg, data.format=torchvision", bad_image("zero bytes", "torchvision")),
        ("30 text .jpg, data.format=torchvision", bad_image("text", "torchvision")),
        ("30 decompression-bomb .jpg, data.format=torchvision", bad_image("bomb", "torchvision")),
        ("30 malicious CIFAR pickle (would create a file)", no_code_ran(cifar("malicious"))),
        ("30 truncated CIFAR batch", cifar("truncated")),
        ("30 garbage CIFAR batch", cifar("garbage")),
        ("30 .beton whose source image was edited", beton("source edited")),
        ("30 .beton with overwritten bytes", beton("overwritten")),
        ("30 truncated .beton", beton("truncated")),
        ("30 .beton without its record (an older or stopped write)", beton("no record")),
        ("30 a loss that becomes NaN (train.lr=1e10)", lambda: failed_one_line(new(), "train.lr=1e10",
                                                                               names="training diverged")),
        ("30 the steps and time estimate printed once", estimate_once),
        ("30 export_features to a read-only place", export(lambda: Path("/proc/feats.npz"), "export_features")),
        ("30 export_features to an existing folder", export(existing_folder, "export_features")),
    ]
    return [
        ("1 rerun of a finished command (changes nothing, says so)", rerun_finished),
        ("1 checkpoint_every_steps=2 saves on the last step", periodic_on_last_step),
        ("2 train.keep_checkpoints=0", lambda: refused(new(), "train.keep_checkpoints=0")),
        ("3 resume with model=resnet18_cifar", resume_changed("model=resnet18_cifar")),
        ("3 resume with another data.subset", resume_changed("data.subset=48")),
        ("3 resume with another method.tau (0.3, default 0.1)", resume_changed("method.tau=0.3")),
        ("3 resume with more epochs (recorded)", resume_recorded("train.epochs=3")),
        ("3 resume with another train.lr (recorded)", resume_recorded("train.lr=0.05")),
        ("4 resume with another train.batch_size", resume_changed("train.batch_size=32")),
        ("6 same-size garbage state.pt", corrupt("state.pt", lambda p: os.urandom(64))),
        ("6 same-size malicious pickle state.pt (would create a file)",
         no_code_ran(corrupt("state.pt", malicious))),
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
        *issue30,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", action="append", default=[],
                        help="run the cases whose name contains this text (repeatable: any of them)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="invprop-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {"clean": 0, "traceback": 0, "silent": 0, "lost": 0}
    for name, attempt in cases(work):
        if args.only and not any(text in name for text in args.only):
            continue
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
