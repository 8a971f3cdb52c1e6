"""The .beton cache checks what it opens (issue 30): a file whose sources were edited, or whose bytes were
overwritten or cut short, is written again with one line saying why; a source image that cannot be read stops
the write in one line naming it."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ffcv")
pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

from datafiles import write_image_folder  # noqa: E402

from invprop.config import group_section  # noqa: E402
from invprop.data import beton_check  # noqa: E402
from invprop.data.beton import read_beton_arrays  # noqa: E402
from invprop.data.beton_cache import ensure_beton, source_files  # noqa: E402
from invprop.data.beton_check import problem, record_path  # noqa: E402
from invprop.data.ffcv.compat import BetonSourceError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _folder_cfg(root: Path):
    return group_section("data", "folder", root=str(root), image_size=32, beton_max_resolution=48)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", classes=2, per_class=(6, 2), sizes=(40, 60))


def _ensure(cfg, where: Path) -> Path:
    return ensure_beton(cfg, "train", where, num_workers=1, progress=False)


def _rewrites(cfg, where: Path, capfd) -> tuple[Path, str]:
    """ensure_beton again: (path, what it printed on stderr)."""
    capfd.readouterr()
    path = _ensure(cfg, where)
    return path, capfd.readouterr().err


def test_a_cached_file_is_reused_untouched_while_it_checks_out(folder: Path, tmp_path: Path, capfd) -> None:
    cfg = _folder_cfg(folder)
    path = _ensure(cfg, tmp_path / "b")
    assert record_path(path).is_file() and problem(path, beton_check.fingerprint(source_files(cfg, "train"))) is None
    stamp = (path.stat().st_mtime_ns, record_path(path).stat().st_mtime_ns)
    again, err = _rewrites(cfg, tmp_path / "b", capfd)
    assert again == path and err == "" and (path.stat().st_mtime_ns, record_path(path).stat().st_mtime_ns) == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, record_path(path).name,
                                                                    f".{path.name}.lock"])


def _damage_middle(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(b"\xff" * 64)


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "source edited", "no record"])
def test_a_stale_or_damaged_file_is_written_again_with_one_line(folder: Path, tmp_path: Path, capfd,
                                                                damage: str) -> None:
    cfg = _folder_cfg(folder)
    path = _ensure(cfg, tmp_path / "b")
    labels = read_beton_arrays(path)["label"]
    size = path.stat().st_size
    if damage == "overwritten":
        _damage_middle(path)
        why = "bytes 0-"  # one chunk: the whole file
    elif damage == "truncated":
        os.truncate(path, size - 1000)
        why = f"it is {size - 1000} bytes, but was written with {size} (truncated or overwritten)"
    elif damage == "source edited":
        image = sorted((folder / "train").rglob("*.jpg"))[3]
        image.write_bytes(image.read_bytes() + b"\0")  # a new size (and time) for one source file
        why = "its source files changed since it was written"
    else:
        record_path(path).unlink()  # as an older version, or a write that stopped, leaves it
        why = "it has no record of what it was written from"
    again, err = _rewrites(cfg, tmp_path / "b", capfd)
    assert again == path and len(err.splitlines()) == 1 and err.startswith(f"rewriting {path}: {why}"), err
    assert problem(path, beton_check.fingerprint(source_files(cfg, "train"))) is None
    np.testing.assert_array_equal(read_beton_arrays(path)["label"], labels)
    assert _rewrites(cfg, tmp_path / "b", capfd)[1] == ""  # written once, then used


def test_a_header_the_sampled_sums_missed_is_still_refused(folder: Path, tmp_path: Path) -> None:
    """Large files have only some chunks summed; the header and index are read back in any case (here a record
    rewritten to match damaged bytes stands for damage in a chunk the sample skipped)."""
    cfg = _folder_cfg(folder)
    path = _ensure(cfg, tmp_path / "b")
    sources = beton_check.fingerprint(source_files(cfg, "train"))
    with open(path, "r+b") as fh:  # FFCV's header starts with the version, then the sample count
        fh.seek(8)
        fh.write(struct.pack("<q", -5))
    beton_check.write_record(path, sources, 12)
    assert problem(path, sources).startswith(("its header does not read back", "its header or index is wrong"))


def test_only_sampled_chunks_are_summed_above_the_full_check_size() -> None:
    assert beton_check._chunks_to_check(10, 10 * beton_check.CHUNK) == list(range(10))
    picked = beton_check._chunks_to_check(1000, beton_check.FULL_CHECK_BYTES + 1)
    assert picked[0] == 0 and picked[-1] == 999 and len(picked) == beton_check.SAMPLED_CHUNKS + 2


def _bomb(path: Path) -> None:
    """A small, valid JPEG whose header claims 65000 x 65000 pixels (PIL refuses it as a decompression bomb)."""
    from PIL import Image

    Image.new("RGB", (16, 16)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bad", ["zero bytes", "text", "decompression bomb"])
def test_an_unreadable_image_stops_the_write_in_one_line_naming_it(folder: Path, tmp_path: Path, capfd,
                                                                    bad: str) -> None:
    image = sorted((folder / "train").rglob("*.jpg"))[5]
    if bad == "zero bytes":
        image.write_bytes(b"")
    elif bad == "text":
        image.write_text("not a picture\n")
    else:
        _bomb(image)
    capfd.readouterr()
    with pytest.raises(BetonSourceError) as err:
        _ensure(_folder_cfg(folder), tmp_path / "b")
    message = str(err.value)
    assert "\n" not in message and message.startswith("writing the .beton stopped at sample ")
    assert f"{image} ({image.stat().st_size} bytes) cannot be read as an image (" in message
    assert message.endswith("; remove or replace it")
    if bad == "decompression bomb":
        assert "DecompressionBomb" in message
    assert "Traceback" not in capfd.readouterr().err  # the writer process ends quietly
    assert [p.name for p in (tmp_path / "b").iterdir() if not p.name.endswith(".lock")] == []


def test_the_launcher_names_an_unreadable_image_in_one_line(folder: Path, tmp_path: Path) -> None:
    image = sorted((folder / "train").rglob("*.jpg"))[2]
    image.write_bytes(b"")
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), "data=folder", f"data.root={folder}",
                           "data.image_size=32", f"data.beton_dir={tmp_path / 'b'}", "train.batch_size=4",
                           "train.num_workers=0", "data.eval_workers=0", "method.k=2", "method.n_pos=2",
                           "method.n_background=8", "eval.untrained_baseline=false", "train.epochs=1",
                           f"out_dir={tmp_path / 'run'}", "train.allow_small_rank_batch=true"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{image} (0 bytes) cannot be read as an image" in errors[0], proc.stderr[-2000:]


def _ensure_on_rank(rank: int, world: int, cfg, where: str) -> tuple[str, int, int, str]:
    """ensure_beton_world on one of `world` gloo ranks: (path, files stat-ed, checks run, error line)."""
    from invprop import distributed
    from invprop.data.beton_cache import CHECKS, ensure_beton_world

    comm = distributed.init(distributed.read_env(), 60.0)
    CHECKS.reset()
    try:
        path, error = str(ensure_beton_world(cfg, "train", Path(where), comm, num_workers=1, progress=False,
                                             poll_s=0.05)), ""
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank says
        path, error = "", f"{type(exc).__name__}: {exc}"
    finally:
        distributed.shutdown()
    return path, CHECKS.stats, CHECKS.checks, error


def test_rank_zero_alone_checks_the_file_for_the_job(folder: Path, tmp_path: Path) -> None:
    from invprop.testing.forked_ranks import run_forked

    cfg = _folder_cfg(folder)
    n = len(source_files(cfg, "train"))
    written = run_forked(_ensure_on_rank, 2, (cfg, str(tmp_path / "b")), timeout_s=200)
    again = run_forked(_ensure_on_rank, 2, (cfg, str(tmp_path / "b")), timeout_s=200)
    assert written[0][0] == written[1][0] == again[0][0] == again[1][0] != ""
    assert [r[1:] for r in written] == [(n, 0, ""), (0, 0, "")]  # rank 0 stat-ed the sources, then wrote it
    assert [r[1:] for r in again] == [(n, 1, ""), (0, 0, "")]  # rank 0 checked it; rank 1 did neither


def test_rank_zero_s_failure_is_named_on_every_rank(folder: Path, tmp_path: Path) -> None:
    from invprop.testing.forked_ranks import run_forked

    _bomb(next((folder / "train").glob("*/*.jpg")))
    first, second = run_forked(_ensure_on_rank, 2, (_folder_cfg(folder), str(tmp_path / "b")), timeout_s=200)
    assert first[0] == second[0] == "" and "cannot be read as an image" in first[3]
    assert second[3].startswith("RuntimeError: rank 0 could not prepare the train .beton") and first[3] in second[3]


def _training_source_on_rank(rank: int, world: int, cfg, where: str) -> tuple[str, str, int, int]:
    """The training batch source of one of `world` gloo ranks under data.format=ffcv: (loader, beton, stats,
    checks)."""
    import torch

    from invprop import distributed
    from invprop.data import load_split
    from invprop.data.beton_cache import CHECKS
    from invprop.data.order import EpochOrder
    from invprop.data.sources import build_batch_source

    distributed.init(distributed.read_env(), 60.0)
    CHECKS.reset()
    try:
        images, labels = load_split(cfg, "train")
        source = build_batch_source(cfg, images, labels, EpochOrder(len(labels), 4, 0), seed=0, workers=1, rank=rank,
                                    world=world, device=torch.device("cpu"), is_main=rank == 0)
        return source.name, source.loader.beton_path, CHECKS.stats, CHECKS.checks
    finally:
        distributed.shutdown()


def test_training_ranks_leave_the_check_to_rank_zero(folder: Path, tmp_path: Path) -> None:
    from invprop.testing.forked_ranks import run_forked

    cfg = group_section("data", "folder", root=str(folder), image_size=32, beton_max_resolution=48,
                        beton_dir=str(tmp_path / "b"), format="ffcv")
    n = len(source_files(cfg, "train"))
    _ensure(cfg, tmp_path / "b")
    first, second = run_forked(_training_source_on_rank, 2, (cfg, str(tmp_path / "b")), timeout_s=200)
    assert first[:2] == second[:2] == ("ffcv", first[1]) and first[1].endswith(".beton")
    assert (first[2:], second[2:]) == ((n, 1), (0, 0))
