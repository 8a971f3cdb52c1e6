"""FFCV path: beton writing (invprop.data.beton, .beton_cache) and the resumable FFCV loaders (invprop.data.ffcv).

Every FFCV ``Loader`` costs a numba compilation, so loaders are built once in module-scoped fixtures and
shared between tests.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("ffcv")
cv2 = pytest.importorskip("cv2")

# numba prints a harmless KeyError from a dispatcher finaliser when an FFCV Loader is collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from invprop.config import group_section  # noqa: E402
from invprop.data.beton import ArraySource, FolderSource, build_source, read_beton_arrays, write_beton  # noqa: E402
from invprop.data.beton_cache import beton_cache_name, ensure_beton  # noqa: E402
from invprop.data.cifar import load_cifar  # noqa: E402
from invprop.data.crop import sample_crop  # noqa: E402
from invprop.data.ffcv.loader import build_ffcv_eval_loader, build_ffcv_train_loader  # noqa: E402
from invprop.data.order import EpochOrder  # noqa: E402
from invprop.data.svhn import load_svhn  # noqa: E402

GLOBAL_BATCH = 240  # divisible by 1, 2 and 3
N_EVEN = 1200  # 5 whole global batches: drop_last drops nothing
N_TAIL = 1300  # 5 whole global batches + a 100-sample tail that drop_last drops
SIZE = 32
SEED = 7
WORKERS = 2
EPOCH = 3
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _syn_cfg(n: int):
    return group_section("data", "synthetic", subset=0, image_size=SIZE, resize_mode="pad", n_train=n, n_test=50,
                         num_classes=10, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Raw betons of the synthetic set (N_EVEN and N_TAIL samples) with their source arrays."""
    d = tmp_path_factory.mktemp("betons")
    out = {}
    for n in (N_EVEN, N_TAIL):
        src = build_source(_syn_cfg(n), "train")
        path = write_beton(src, d / f"syn{n}.beton", num_workers=WORKERS, progress=False)
        out[n] = (path, src)
    return out


def _epoch(loader, epoch, start_batch=0):
    return [tuple(t.clone() for t in b) for b in loader.epoch(epoch, start_batch)]


@pytest.fixture(scope="module")
def rank_loaders(data):
    """Training loaders (seeded crops on) for W = 1, 2, 3 over the N_EVEN beton: {W: [rank 0, ...]}."""
    path, _ = data[N_EVEN]
    order = EpochOrder(N_EVEN, GLOBAL_BATCH, SEED)
    return {
        w: [build_ffcv_train_loader(path, order, r, w, WORKERS, 24, SEED) for r in range(w)]
        for w in (1, 2, 3)
    }


@pytest.fixture(scope="module")
def reference_epoch(rank_loaders):
    """Uninterrupted epoch EPOCH with W = 1: list of (images, labels, indices) global batches."""
    return _epoch(rank_loaders[1][0], EPOCH)


# ------------------------------------------------------------------------------------------------------
# Writing and reading back
# ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_raw_beton_reads_back_exact_synthetic(data):
    path, src = data[N_EVEN]
    meta = read_beton_arrays(path)
    np.testing.assert_array_equal(meta["index"], np.arange(N_EVEN))
    np.testing.assert_array_equal(meta["label"], src.labels)

    ev = build_ffcv_eval_loader(path, 500, WORKERS, SIZE)
    batches = list(ev)
    assert [len(b[0]) for b in batches] == [500, 500, 200]  # eval keeps the last partial batch
    images = torch.cat([b[0] for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (N_EVEN, 3, SIZE, SIZE) and images.is_contiguous()
    assert torch.equal(images, torch.from_numpy(src.images))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(src.labels))
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(N_EVEN))
    assert len(list(ev)) == 3  # reusable

    # The training decoder with crops off returns the stored pixels too, in the EpochOrder order.
    order = EpochOrder(N_EVEN, GLOBAL_BATCH, SEED)
    tr = build_ffcv_train_loader(path, order, 0, 1, WORKERS, SIZE, SEED, crop=False)
    for b, (img, lab, idx) in enumerate(_epoch(tr, 0)):
        assert torch.equal(idx, order.global_batch_indices(0, b))
        assert torch.equal(img, torch.from_numpy(src.images[idx.numpy()]))
        assert torch.equal(lab, torch.from_numpy(src.labels[idx.numpy()]))


@pytest.mark.timeout(300)
@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="no Fashion-MNIST")
def test_raw_beton_reads_back_exact_fashion_mnist(tmp_path):
    from invprop.data import load_split

    cfg = group_section("data", "fashion_mnist", root=None, subset=600, image_size=SIZE, resize_mode="pad")
    path = ensure_beton(cfg, "train", tmp_path, num_workers=WORKERS, progress=False)
    assert path.name.startswith("fashion_mnist-600-train-32px-raw-") and path.suffix == ".beton"
    mtime = path.stat().st_mtime_ns
    assert ensure_beton(cfg, "train", tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
    other = OmegaConf.merge(cfg, {"resize_mode": "resize"})
    assert beton_cache_name(other, "train") != path.name  # a changed config never reuses the file

    images, labels = load_split(cfg, "train")
    ev = build_ffcv_eval_loader(path, 256, WORKERS, SIZE)
    got = [b for b in ev]
    assert torch.equal(torch.cat([b[0] for b in got]), images)
    assert torch.equal(torch.cat([b[1] for b in got]), labels)
    assert torch.equal(torch.cat([b[2] for b in got]), torch.arange(600))


@pytest.mark.timeout(300)
def test_write_refuses_overwrite_and_leaves_no_temp_files(tmp_path):
    src = ArraySource(np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8), np.arange(40))
    path = write_beton(src, tmp_path / "a.beton", num_workers=1, progress=False)
    size = path.stat().st_size
    with pytest.raises(FileExistsError):
        write_beton(src, path, num_workers=1, progress=False)
    assert path.stat().st_size == size
    write_beton(src, path, num_workers=1, progress=False, overwrite=True, mode="jpg", jpeg_quality=80)
    assert sorted(os.listdir(tmp_path)) == ["a.beton"]

    class Broken(ArraySource):
        def __getitem__(self, i):
            if i == 17:
                raise OSError("unreadable image 17")
            return super().__getitem__(i)

    bad = Broken(src.images, src.labels)
    with pytest.raises(RuntimeError, match="unreadable image 17"):
        write_beton(bad, tmp_path / "b.beton", num_workers=2, chunksize=5, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a.beton"]


@pytest.mark.timeout(300)
def test_jpg_beton_decodes_close_to_source(data, tmp_path):
    _, src = data[N_EVEN]
    small = ArraySource(src.images[:120], src.labels[:120])
    path = write_beton(small, tmp_path / "j.beton", mode="jpg", jpeg_quality=95, num_workers=1,
                       progress=False)
    got = torch.cat([b[0] for b in build_ffcv_eval_loader(path, 50, WORKERS, SIZE)])
    err = float((got.float() - torch.from_numpy(small.images).float()).abs().mean())
    ref = []  # the same round trip through OpenCV (the noisy synthetic images lose ~12 grey levels)
    for im in small.images:
        hwc = cv2.cvtColor(np.ascontiguousarray(im.transpose(1, 2, 0)), cv2.COLOR_RGB2BGR)
        enc = cv2.imencode(".jpg", hwc, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
        dec = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        ref.append(np.abs(dec.astype(float) - hwc[..., ::-1]).mean())
    assert abs(err - float(np.mean(ref))) < 1.0, (err, float(np.mean(ref)))
    order = EpochOrder(120, 40, SEED)
    tr = build_ffcv_train_loader(path, order, 0, 1, WORKERS, 16, SEED, flip=True)
    a, b = _epoch(tr, 0), _epoch(tr, 0)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))  # seeded
    assert a[0][0].shape == (40, 3, 16, 16)


@pytest.mark.timeout(300)
def test_standard_file_sources(tmp_path):
    # CIFAR-10 python release layout, tiny: 5 train batches of 2 + a test batch of 3.
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expect = []
    for name, n in [*[(f"data_batch_{i}", 2) for i in range(1, 6)], ("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        expect.append((name, data, labels))
    images, labels = load_cifar(tmp_path, "train", 10)
    assert images.shape == (10, 32, 32, 3) and labels.tolist() == sum((e[2] for e in expect[:5]), [])
    np.testing.assert_array_equal(images[0], expect[0][1][0].reshape(3, 32, 32).transpose(1, 2, 0))
    cfg = {"name": "cifar10", "root": str(folder), "subset": 4}
    src = build_source(cfg, "train")
    assert len(src) == 4 and len(build_source(cfg, "test")) == 3  # subset restricts training only

    # SVHN cropped-digits release: X is (32, 32, 3, N), y is (N, 1) with 10 standing for the digit 0.
    from scipy.io import savemat

    svhn_x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": svhn_x, "y": np.array([[10], [1], [2], [10], [9]])})
    images, labels = load_svhn(tmp_path, "train")
    assert labels.tolist() == [0, 1, 2, 0, 9]
    np.testing.assert_array_equal(images[3], svhn_x[:, :, :, 3])
    path = write_beton(build_source({"name": "svhn", "root": str(tmp_path)}, "train"), tmp_path / "svhn.beton",
                       num_workers=1, progress=False)
    assert read_beton_arrays(path)["label"].tolist() == [0, 1, 2, 0, 9]

    # ImageNet-style folder: root/<split>/<class>/<file>, classes sorted, labels from folder order.
    from PIL import Image

    for cls, n in (("b_dog", 2), ("a_cat", 3)):
        (tmp_path / "imgs" / "train" / cls).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / "train" / cls / f"{i}.png")
    fs = FolderSource(tmp_path / "imgs", "train")
    assert fs.classes == ["a_cat", "b_dog"] and fs.labels.tolist() == [0, 0, 0, 1, 1]
    path = write_beton(fs, tmp_path / "f.beton", max_resolution=16, num_workers=1, progress=False)
    meta = read_beton_arrays(path)
    assert meta["label"].tolist() == [0, 0, 0, 1, 1] and meta["index"].tolist() == [0, 1, 2, 3, 4]
    ev = build_ffcv_eval_loader(path, 4, 1, 12, center_crop_ratio=1.0)  # variable sizes: centre crop
    shapes = [tuple(b[0].shape) for b in ev]
    assert shapes == [(4, 3, 12, 12), (1, 3, 12, 12)]


# ------------------------------------------------------------------------------------------------------
# Order: disjoint ranks, same global order for any W, drop_last
# ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_index_once_and_same_global_order_for_any_world(rank_loaders, reference_epoch, world):
    order = EpochOrder(N_EVEN, GLOBAL_BATCH, SEED)
    per_rank = [_epoch(ld, EPOCH) for ld in rank_loaders[world]]
    assert all(len(r) == order.num_batches == 5 for r in per_rank)
    seen = torch.cat([b[2] for r in per_rank for b in r])
    assert torch.equal(seen.sort().values, torch.arange(N_EVEN))  # every index exactly once
    for b, ref in enumerate(reference_epoch):
        parts = [r[b] for r in per_rank]
        assert all(len(p[2]) == GLOBAL_BATCH // world for p in parts)
        assert torch.equal(torch.cat([p[2] for p in parts]), ref[2])  # same global batch, rank slices
        assert torch.equal(torch.cat([p[2] for p in parts]), order.global_batch_indices(EPOCH, b))
        # Seeded crops: identical pixels whatever the world size / position in the local batch.
        assert torch.equal(torch.cat([p[0] for p in parts]), ref[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), ref[1])


@pytest.mark.timeout(300)
def test_drop_last_drops_exactly_the_documented_tail(data):
    path, _ = data[N_TAIL]
    order = EpochOrder(N_TAIL, GLOBAL_BATCH, SEED)
    assert order.num_batches == 5
    loaders = [build_ffcv_train_loader(path, order, r, 2, WORKERS, SIZE, SEED) for r in range(2)]
    for epoch in (0, 1):
        per_rank = [_epoch(ld, epoch) for ld in loaders]
        assert [len(r) for r in per_rank] == [5, 5]
        assert all(len(b[2]) == GLOBAL_BATCH // 2 for r in per_rank for b in r)
        seen = torch.cat([b[2] for r in per_rank for b in r])
        assert len(seen) == len(set(seen.tolist())) == 1200
        tail = order.permutation(epoch)[order.num_batches * GLOBAL_BATCH :]
        assert set(range(N_TAIL)) - set(seen.tolist()) == set(tail.tolist())  # the 100 not seen


@pytest.mark.timeout(300)
def test_eval_loader_shards_rows_like_the_bank(data):
    from invprop.bank import shard_bounds

    path, src = data[N_TAIL]
    rows = []
    for r in range(3):
        ev = build_ffcv_eval_loader(path, 200, WORKERS, SIZE, rank=r, world=3)
        got = list(ev)
        idx = torch.cat([b[2] for b in got])
        assert (int(idx[0]), int(idx[-1]) + 1) == shard_bounds(N_TAIL, r, 3)
        assert torch.equal(torch.cat([b[0] for b in got]), torch.from_numpy(src.images[idx.numpy()]))
        rows.append(idx)
    assert torch.equal(torch.cat(rows), torch.arange(N_TAIL))


# ------------------------------------------------------------------------------------------------------
# Resume mid-epoch, seeded crops
# ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("k", [0, 2, 4, 5])
def test_resume_after_k_batches_matches_uninterrupted(rank_loaders, reference_epoch, k):
    ld = rank_loaders[1][0]
    run = ld.epoch(EPOCH)
    head = [tuple(t.clone() for t in next(run)) for _ in range(k)]
    assert run.next_batch == k  # the position to checkpoint
    run.close()  # interrupted (prefetched batches are thrown away)
    ld.epoch(EPOCH + 1)  # other work in between does not matter
    tail = _epoch(ld, EPOCH, start_batch=k)
    assert len(tail) == 5 - k
    for got, ref in zip(head + tail, reference_epoch, strict=True):
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b)


@pytest.mark.timeout(300)
def test_resume_on_fresh_loader_with_other_world_size(data, reference_epoch):
    """A restarted job (new Loader, here W=3 instead of 1) resumes at batch 3 with identical batches."""
    path, _ = data[N_EVEN]
    order = EpochOrder(N_EVEN, GLOBAL_BATCH, SEED)
    ranks = [build_ffcv_train_loader(path, order, r, 3, WORKERS, 24, SEED) for r in range(3)]
    parts = [_epoch(ld, EPOCH, start_batch=3) for ld in ranks]
    for b in range(2):
        ref = reference_epoch[3 + b]
        assert torch.equal(torch.cat([p[b][2] for p in parts]), ref[2])
        assert torch.equal(torch.cat([p[b][0] for p in parts]), ref[0])


@pytest.mark.timeout(300)
def test_crops_follow_seed_epoch_index(data, reference_epoch):
    _, src = data[N_EVEN]
    images, _, idx = reference_epoch[0]
    for j in range(0, 40, 3):
        i = int(idx[j])
        top, left, h, w, _flip = sample_crop(SEED, EPOCH, i, SIZE, SIZE, scale=(0.2, 1.0))  # flip is off
        assert 0.2 * SIZE * SIZE * 0.8 <= h * w <= SIZE * SIZE and 0 <= top <= SIZE - h and 0 <= left <= SIZE - w
        img = src.images[i].transpose(1, 2, 0)[top : top + h, left : left + w]
        expect = cv2.resize(np.ascontiguousarray(img), (24, 24), interpolation=cv2.INTER_AREA)
        diff = np.abs(images[j].permute(1, 2, 0).numpy().astype(int) - expect.astype(int))
        assert diff.max() <= 1, (i, diff.max())
    # Another epoch gives other crops of the same samples.
    assert sample_crop(SEED, EPOCH, int(idx[0]), SIZE, SIZE) != sample_crop(SEED, EPOCH + 1, int(idx[0]), SIZE, SIZE)


def test_more_workers_than_cores_gives_the_same_epoch(data, reference_epoch):
    """A recipe's num_workers (e.g. 8) on a smaller machine: FFCV itself refuses more threads than cores; the
    loader uses what there is and yields exactly the same batches."""
    import os

    path, _ = data[N_EVEN]
    wide = build_ffcv_train_loader(path, EpochOrder(N_EVEN, GLOBAL_BATCH, SEED), 0, 1,
                                   4 * len(os.sched_getaffinity(0)), 24, SEED)
    for (img, lab, idx), (ref_img, ref_lab, ref_idx) in zip(_epoch(wide, EPOCH), reference_epoch, strict=True):
        assert torch.equal(idx, ref_idx) and torch.equal(lab, ref_lab) and torch.equal(img, ref_img)


@pytest.mark.slow  # a fresh interpreter imports FFCV and compiles its pipeline: about a minute
def test_beton_writer_prints_plain_lines_in_a_job_log(tmp_path: Path) -> None:
    """Without a terminal (a SLURM log) the writer's progress is a plain line with a rate, not a squeezed bar."""
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from pathlib import Path\n"
        "from composed import compose_config\n"
        "from datafiles import write_image_folder\n"
        "from invprop.config import typed\n"
        "from invprop.data.beton_cache import ensure_beton\n"
        f"root = write_image_folder(Path({str(tmp_path / 'img')!r}), classes=3, per_class=(20, 5))\n"
        "cfg = typed(compose_config('data=folder', f'data.root={root}', 'data.format=ffcv', 'data.image_size=32'))\n"
        f"ensure_beton(cfg.data, 'train', {str(tmp_path / 'betons')!r}, num_workers=1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "━" not in out.stdout
    assert "img 60/60 100.0%" in out.stdout and "img/s" in out.stdout
