"""CIFAR pickles and ImageNet-style folders written by the tests: reading, validation, both loaders' crops,
training through FFCV and torchvision, and an exact resume on a folder data set."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from composed import compose_config
from datafiles import write_cifar, write_image_folder
from PIL import Image

from invprop.config import ConfigError, group_section, validate
from invprop.data import eval_batches, eval_split, load_split, normalization, num_classes
from invprop.data.crop import sample_crop, stored_size
from invprop.data.folder import FolderDataError, scan_split
from invprop.data.geometric import resize_uint8
from invprop.data.loader import IndexedImageDataset
from invprop.data.order import EpochOrder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("real")
    return {"cifar10": write_cifar(base / "c10", 10), "cifar100": write_cifar(base / "c100", 100, 300, 100),
            "folder": write_image_folder(base / "folder")}


def _cfg(*overrides: str):
    return compose_config(*overrides)


# ------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_train"), [("cifar10", 200), ("cifar100", 300)])
def test_cifar_reads_the_official_pickles(files, name, n_train):
    folder = files[name]
    cfg = group_section("data", name, root=str(folder.parent), image_size=32)
    images, labels = load_split(cfg, "train")
    first = "data_batch_1" if name == "cifar10" else "train"
    with open(folder / first, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    rows = len(raw[b"data"])
    assert images.shape == (n_train, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:rows], torch.from_numpy(raw[b"data"]).view(rows, 3, 32, 32))
    assert labels[:rows].tolist() == raw[b"labels" if name == "cifar10" else b"fine_labels"]
    assert eval_split(cfg) == "test" and len(load_split(cfg, "test")[1]) == 100
    assert num_classes(cfg) == (10 if name == "cifar10" else 100)
    assert normalization(cfg)[0][0] == (0.4914 if name == "cifar10" else 0.5071)


def test_folder_images_are_lazy_and_match_the_files(files):
    cfg = group_section("data", "folder", root=str(files["folder"]), image_size=48, beton_max_resolution=256,
                        subset=30, eval_workers=0)
    images, labels = load_split(cfg, "train")
    _, paths, all_labels = scan_split(str(files["folder"]), "train")
    assert len(paths) == 60 and eval_split(cfg) == "val" and num_classes(cfg) == 3
    assert len(images) == 30 and sorted(set(labels.tolist())) == [0, 1, 2]  # spread over classes, not the first 30
    assert labels.tolist() == all_labels[::2].tolist()
    for i in (0, 7, 29):
        with Image.open(images.paths[i]) as im:
            h, w = stored_size(im.height, im.width, 256)
        assert tuple(images[i].shape) == (3, h, w)  # decoded, shrunk like the beton
    batches = list(eval_batches(images[5:17], 5, num_workers=0))
    assert [b.shape[0] for b in batches] == [5, 5, 2] and batches[0].shape[1:] == (3, 48, 48)
    assert torch.equal(torch.cat(batches), torch.stack([images.eval_image(i) for i in range(5, 17)]))
    val_images, val_labels = load_split(cfg, "val")
    assert len(val_images) == 24 and len(val_labels) == 24  # subset applies to training only


def _folder_error(root: Path, split: str = "train") -> str:
    with pytest.raises(FolderDataError) as info:
        scan_split.__wrapped__(str(root), split)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_folder_layout_errors_are_one_line(tmp_path):
    assert "does not exist" in _folder_error(tmp_path / "nowhere")
    (tmp_path / "a" / "images").mkdir(parents=True)
    assert "has no 'train' folder" in _folder_error(tmp_path / "a")
    (tmp_path / "b" / "train" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "train" / "only" / "x.png")
    assert "1 class folder(s)" in _folder_error(tmp_path / "b")
    (tmp_path / "c" / "train" / "x").mkdir(parents=True)
    (tmp_path / "c" / "train" / "y").mkdir(parents=True)
    (tmp_path / "c" / "train" / "y" / "notes.txt").write_text("no image")
    assert "no images" in _folder_error(tmp_path / "c")


def test_symlinked_folders_inside_a_class_are_not_entered_and_empty_classes_are_named(files, tmp_path):
    """A link to '.' would repeat a class's images, one to '..' would file every class under it (issue 30)."""
    root = tmp_path / "linked"
    shutil.copytree(files["folder"], root, symlinks=True)
    first = sorted(p for p in (root / "train").iterdir())[0]
    (first / "loop").symlink_to(".")
    (first / "up").symlink_to("..")
    classes, paths, labels = scan_split(str(root), "train")
    want_classes, want_paths, want_labels = scan_split(str(files["folder"]), "train")
    assert classes == want_classes and len(paths) == len(want_paths)
    assert np.array_equal(labels, want_labels)
    (root / "train" / "zz_empty").mkdir()
    with pytest.raises(FolderDataError, match=r"class folder .*zz_empty has no images"):
        scan_split.__wrapped__(str(root), "train")


@pytest.mark.parametrize(("make", "expect"), [
    (lambda p: p / "missing", "data.root="),
    (lambda p: p, "has no 'train' folder"),
    (lambda p: None, "data.root is null"),
])
def test_validation_names_the_root(tmp_path, make, expect):
    root = make(tmp_path)
    cfg = _cfg("+experiment=imagenet_r50", f"data.root={root if root is not None else 'null'}")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert expect in str(info.value) and "\n" not in str(info.value)


def test_validation_of_a_missing_val_split(files, tmp_path):
    root = tmp_path / "noval"
    root.mkdir()
    (root / "train").symlink_to(files["folder"] / "train", target_is_directory=True)
    with pytest.raises(ConfigError, match="has no 'val' folder"):
        validate(_cfg("data=folder", f"data.root={root}", "train.batch_size=20"))
    validate(_cfg("data=folder", f"data.root={files['folder']}", "train.batch_size=20"))  # the good tree passes


# ------------------------------------------------------------------------------------------------------
# the two loaders crop the same sample the same way
# ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_ffcv_and_torchvision_crop_the_same_box(files, tmp_path):
    """Both paths take the box and flip of crop.sample_crop for (seed, epoch, index): the torchvision path's
    pixels are exactly that box resized (torch), FFCV's are that box resized by its own kernel (cv2 area)."""
    pytest.importorskip("ffcv")
    cv2 = pytest.importorskip("cv2")
    from invprop.data.beton_cache import ensure_beton
    from invprop.data.ffcv.loader import build_ffcv_train_loader

    size, seed, epoch = 40, 5, 2
    # raw beton, no shrinking: FFCV stores exactly the pixels that PIL decodes for the torchvision path
    cfg = group_section("data", "folder", root=str(files["folder"]), image_size=size, beton_mode="raw",
                        beton_max_resolution=512, subset=20, eval_workers=0)
    images, labels = load_split(cfg, "train")
    beton = ensure_beton(cfg, "train", tmp_path, num_workers=1, progress=False)
    order = EpochOrder(len(images), 10, seed)
    ffcv = build_ffcv_train_loader(beton, order, 0, 1, 1, size, seed, flip=True)
    tv = IndexedImageDataset(images, labels, train=True, seed=seed, out_size=size, flip=True)
    tv.set_epoch(epoch)
    got, idx_seen, flips = next(iter(ffcv.epoch(epoch))), [], 0
    for img, label, index in zip(*got, strict=True):
        i = int(index)
        src = images[i]
        top, left, h, w, flip = sample_crop(seed, epoch, i, src.shape[1], src.shape[2])
        box = src[:, top : top + h, left : left + w]
        want_tv = resize_uint8(box, size)
        want_ff = torch.from_numpy(cv2.resize(np.ascontiguousarray(box.permute(1, 2, 0).numpy()), (size, size),
                                              interpolation=cv2.INTER_AREA)).permute(2, 0, 1)
        if flip:
            want_tv, want_ff, flips = want_tv.flip(-1), want_ff.flip(-1), flips + 1
        tv_img, tv_label, _ = tv[i]
        assert torch.equal(tv_img, want_tv) and tv_label == int(label) == int(labels[i])
        assert (img.int() - want_ff.int()).abs().max() <= 1, i
        assert (img.float() - tv_img.float()).abs().mean() < 6  # same box; only the resize kernels differ
        idx_seen.append(i)
    assert torch.equal(torch.tensor(idx_seen), order.global_batch_indices(epoch, 0))
    assert 0 < flips < len(idx_seen)
    other = IndexedImageDataset(images, labels, train=True, seed=seed, out_size=size, flip=True)
    other.set_epoch(epoch + 1)
    assert (other[idx_seen[0]][0].float() - got[0][0].float()).abs().mean() > 6  # another epoch: another crop
    ffcv.close()


# ------------------------------------------------------------------------------------------------------
# training runs through the launcher
# ------------------------------------------------------------------------------------------------------

SMALL = ["train.epochs=1", "train.log_every=1", "method.n_pos=10", "method.warmup_epochs=1",
         "eval.untrained_baseline=false", "deterministic=true"]


# The launcher with FFCV made unimportable, as on a site that could not build it.
WITHOUT_FFCV = ("import runpy, sys; sys.modules['ffcv'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")


def _launch(run: Path, *overrides: str, timeout: float = 240, ffcv: bool = True) -> subprocess.CompletedProcess:
    prefix = [sys.executable] if ffcv else [sys.executable, "-c", WITHOUT_FFCV]
    return subprocess.run([*prefix, str(ROOT / "launchers/submit.py"), *SMALL, *overrides, f"out_dir={run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _cifar_args(files, fmt: str, tmp_path: Path, name: str = "cifar10") -> list[str]:
    return [f"data={name}", f"data.root={files[name]}", f"data.format={fmt}", f"data.beton_dir={tmp_path / 'b'}",
            "train.batch_size=40", "train.num_workers=1"]


def _folder_args(files, fmt: str, tmp_path: Path) -> list[str]:
    return ["data=folder", f"data.root={files['folder']}", f"data.format={fmt}", "data.image_size=32",
            "data.eval_workers=0", f"data.beton_dir={tmp_path / 'b'}", "train.batch_size=20", "train.num_workers=1"]


def _check_run(run: Path, proc: subprocess.CompletedProcess, images: int, steps: int, classes: int) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(run)
    assert res["images"] == images and res["steps"] == steps and _steps(run) == list(range(1, steps + 1))
    assert res["knn_top1"] > 1.5 / classes  # the pictures' classes are told apart from the first epoch
    return res


@pytest.mark.timeout(300)
def test_cifar10_trains_through_torchvision_when_ffcv_is_missing(files, tmp_path):
    run = tmp_path / "run"
    proc = _launch(run, *_cifar_args(files, "ffcv", tmp_path), ffcv=False)
    res = _check_run(run, proc, 200, 5, 10)
    assert proc.stderr.count("FFCV is not installed") == 1  # said once, then the torchvision loader
    assert res["knn_backbone_top1"] > 0.15 and not (tmp_path / "b").exists()  # no beton on this path


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_folder_trains_through_ffcv(files, tmp_path):
    pytest.importorskip("ffcv")
    run = tmp_path / "run"
    res = _check_run(run, _launch(run, *_folder_args(files, "ffcv", tmp_path)), 60, 3, 3)
    # training's .beton, and the val split's that the kNN evaluation reads through FFCV too
    betons = sorted(p.name.split("-")[:4] for p in (tmp_path / "b").glob("*.beton"))
    assert betons == [["folder", "train", "32px", "jpg"], ["folder", "val", "32px", "jpg"]]
    assert res["knn_backbone_top1"] > 0.5 and res["loader"] == "ffcv" and res["eval_knn_loader"] == "ffcv"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cifar_trains_through_ffcv_and_cifar100_through_torchvision(files, tmp_path):
    pytest.importorskip("ffcv")
    run = tmp_path / "ffcv"
    _check_run(run, _launch(run, *_cifar_args(files, "ffcv", tmp_path)), 200, 5, 10)
    assert [p.name.split("-")[:4] for p in (tmp_path / "b").glob("*.beton")] == [["cifar10", "train", "32px", "raw"]]
    run = tmp_path / "c100"
    _check_run(run, _launch(run, *_cifar_args(files, "torchvision", tmp_path, "cifar100")), 300, 7, 100)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_folder_torchvision_with_linear_and_semisup_from_a_list_file(files, tmp_path):
    names = tmp_path / "1percent.txt"
    _, paths, _ = scan_split(str(files["folder"]), "train")
    names.write_text("".join(Path(p).name + "\n" for p in (paths[0], paths[25], paths[50])))
    run = tmp_path / "run"
    proc = _launch(run, *_folder_args(files, "torchvision", tmp_path), "eval.protocols=[knn,linear,semisup]",
                   "eval.linear.epochs=3", "eval.semisup.epochs=1", f"eval.semisup.subset_files={{1pct:'{names}'}}",
                   timeout=500)
    res = _check_run(run, proc, 60, 3, 3)
    assert res["semisup_1pct_labels"] == 3 and res["semisup_10pct_labels"] == 6  # the list, then a balanced draw
    assert 0 <= res["linear_top1"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["ffcv", pytest.param("torchvision", marks=pytest.mark.extended)])
def test_folder_resume_after_usr2_equals_uninterrupted(files, tmp_path, fmt):
    if fmt == "ffcv":
        pytest.importorskip("ffcv")
    args = [*_folder_args(files, fmt, tmp_path), "train.epochs=2"]
    reference = tmp_path / "ref"
    _check_run(reference, _launch(reference, *args), 60, 6, 3)
    run = tmp_path / "run"
    stopped = _launch(run, *args, "train.stop_at_step=2")  # mid-epoch 0 (3 steps per epoch), a real USR2
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "stopped at step 2 with a committed checkpoint" in stopped.stdout
    proc = _launch(run, *args, timeout=300)
    assert proc.returncode == 0 and "resumed from" in proc.stderr and "step 2)" in proc.stderr, proc.stderr[-3000:]
    assert _results(run)["state_digest"] == _results(reference)["state_digest"]
    assert _steps(run) == list(range(1, 7))


class _RunsCode:
    """Pickles to a call of os.system: what a planted CIFAR batch file could do when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch"])
def test_a_cifar_file_that_would_run_code_is_refused_unrun(tmp_path, name):
    release = write_cifar(tmp_path / "c10", 10)
    marker = tmp_path / "ran"
    with open(release / name, "wb") as fh:
        pickle.dump({b"data": _RunsCode(f"touch {marker}"), b"labels": [0]}, fh)
    with pytest.raises(ConfigError) as info:
        validate(_cfg("data=cifar10", f"data.root={release}"))
    message = str(info.value)
    assert "is not a CIFAR batch file: it asks for posix.system" in message and "\n" not in message
    assert not marker.exists()  # refused before the call, not after


def test_a_truncated_cifar_file_is_named_in_one_line(tmp_path):
    release = write_cifar(tmp_path / "c10", 10)
    data = (release / "data_batch_3").read_bytes()
    (release / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as info:
        validate(_cfg("data=cifar10", f"data.root={release}"))
    message = str(info.value)
    assert "data_batch_3 cannot be read as a CIFAR batch file" in message and "\n" not in message
