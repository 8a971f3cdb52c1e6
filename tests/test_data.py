"""Data path: order, datasets, augmentations and the DataLoader path (invprop.data)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from invprop.config import group_section
from invprop.data import (
    BatchColorAugment,
    EpochOrder,
    IndexedImageDataset,
    Normalize,
    batch_generator,
    build_train_loader,
    dataset_size,
    derive_seed,
    eval_transform,
    load_fashion_mnist,
    load_split,
    make_synthetic,
    normalization,
    num_classes,
    random_resized_crop,
    read_idx,
)
from invprop.data import color as C
from invprop.data import fashion_mnist as fm
from invprop.data import geometric as G
from invprop.data.crop import box_from_uniforms, sample_crop
from invprop.data.datasets import normalization_from_data

FASHION_DIR = fm.DEFAULT_ROOT


def cfg(**kw):
    """The `data=<name>` section as configs/ states it, with `kw` on top."""
    return group_section("data", kw["name"], **kw)


# ------------------------------------------------------------------------------------------------------
# seeding / order
# ------------------------------------------------------------------------------------------------------


def test_derive_seed_is_stable_and_order_sensitive():
    assert derive_seed(1, 2) == derive_seed(1, 2)
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(0) != derive_seed()
    assert 0 <= derive_seed(2**70, -5) < 2**63
    # Pinned value: a change here silently changes every resumed run's data order.
    assert derive_seed(0, 0) == 5320122090117835074


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slices_partition_the_global_batch(world):
    order = EpochOrder(n=100, global_batch=12, seed=7)
    assert order.num_batches == 8 and len(order) == 8
    for epoch in (0, 3):
        for b in range(order.num_batches):
            glob = order.global_batch_indices(epoch, b)
            parts = [order.local_indices(epoch, b, r, world) for r in range(world)]
            assert all(p.shape == (12 // world,) and p.dtype == torch.int64 for p in parts)
            assert torch.equal(torch.cat(parts), glob)
            assert len(set(torch.cat(parts).tolist())) == 12  # disjoint


def test_epoch_covers_distinct_indices_drop_last():
    order = EpochOrder(n=100, global_batch=12, seed=7)
    seen = torch.cat([order.global_batch_indices(2, b) for b in range(order.num_batches)])
    assert seen.numel() == 96 and len(set(seen.tolist())) == 96
    assert seen.min() >= 0 and seen.max() < 100
    assert torch.equal(seen, order.permutation(2)[:96])


def test_order_depends_on_seed_and_epoch_only():
    a, b, c = EpochOrder(1000, 100, 1), EpochOrder(1000, 100, 1), EpochOrder(1000, 100, 2)
    assert torch.equal(a.global_batch_indices(0, 3), b.global_batch_indices(0, 3))
    assert torch.equal(a.permutation(5), b.permutation(5))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert not torch.equal(a.permutation(0), c.permutation(0))
    # Exactly the documented construction: randperm from a generator seeded with derive_seed(seed, epoch).
    ref = torch.randperm(1000, generator=torch.Generator().manual_seed(derive_seed(1, 4)))
    assert torch.equal(a.permutation(4), ref)
    # Asking for another epoch in between does not disturb the cache.
    first = a.global_batch_indices(0, 0)
    a.global_batch_indices(9, 0)
    assert torch.equal(a.global_batch_indices(0, 0), first)


def test_order_errors():
    with pytest.raises(ValueError):
        EpochOrder(10, 11, 0)
    order = EpochOrder(100, 12, 0)
    with pytest.raises(ValueError):
        order.local_indices(0, 0, 0, 5)
    with pytest.raises(ValueError):
        order.local_indices(0, 0, 3, 3)
    with pytest.raises(IndexError):
        order.global_batch_indices(0, 8)


# ------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------------


def _raw_idx_bytes(name: str) -> bytes:
    with gzip.open(FASHION_DIR / f"{name}.gz", "rb") as f:
        return f.read()


def test_fashion_pixels_equal_idx_bytes():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype.name == "uint8"
    assert labels.shape == (60000,) and labels.dtype.name == "int64"
    raw = _raw_idx_bytes("train-images-idx3-ubyte")
    assert struct.unpack(">IIII", raw[:16]) == (2051, 60000, 28, 28)
    assert images.tobytes() == raw[16:]
    raw_l = _raw_idx_bytes("train-labels-idx1-ubyte")
    assert bytes(labels.astype("uint8").tobytes()) == raw_l[8:]
    t_images, t_labels = load_fashion_mnist("test")
    assert t_images.shape == (10000, 28, 28) and sorted(set(t_labels.tolist())) == list(range(10))


def test_fashion_load_split_pad_and_subset():
    raw_images, raw_labels = load_fashion_mnist("train")
    c = cfg(name="fashion_mnist", root=None, subset=300, image_size=32, resize_mode="pad")
    images, labels = load_split(c, "train")
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.from_numpy(raw_labels[:300]))
    for ch in range(3):  # grey replicated into every channel, centred, zero border
        assert torch.equal(images[:, ch, 2:30, 2:30], torch.from_numpy(raw_images[:300]))
    border = images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.abs().sum()) == 0
    test_images, _ = load_split(c, "test")  # the test split is never subset
    assert test_images.shape == (10000, 3, 32, 32)
    assert dataset_size(c, "train") == 300 and dataset_size(c, "test") == 10000
    assert dataset_size(cfg(name="fashion_mnist", subset=0)) == 60000
    assert dataset_size(cfg(name="fashion_mnist", subset=10**9)) == 60000
    assert num_classes(c) == 10


def test_fashion_resize_mode():
    raw_images, _ = load_fashion_mnist("train")
    c = cfg(name="fashion_mnist", subset=8, image_size=32, resize_mode="resize")
    images, _ = load_split(c, "train")
    ref = F.interpolate(torch.from_numpy(raw_images[:8]).unsqueeze(1).float(), size=(32, 32), mode="bilinear")
    ref = ref.round().clamp(0, 255).to(torch.uint8)
    assert images.shape == (8, 3, 32, 32) and torch.equal(images[:, 1:2], ref)
    assert torch.equal(images[:, 0], images[:, 2])


def test_fashion_normalization_table_matches_data():
    for mode in ("pad", "resize"):
        c = cfg(name="fashion_mnist", resize_mode=mode, image_size=32, subset=0)
        images, _ = load_split(c, "train")
        mean, std = normalization(c)
        got_mean, got_std = normalization_from_data(images[::16, :1])  # grey: one channel is enough
        assert got_mean == pytest.approx(mean[:1], abs=3e-3) and got_std == pytest.approx(std[:1], abs=3e-3)


def test_fashion_root_override_uncompressed(tmp_path: Path):
    imgs = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 5, 28, 28) + imgs.numpy().tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 5) + bytes([3, 1, 4, 1, 5]))
    images, labels = load_fashion_mnist("test", root=tmp_path)
    assert torch.equal(torch.from_numpy(images), imgs) and labels.tolist() == [3, 1, 4, 1, 5]
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").tolist() == [3, 1, 4, 1, 5]
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad")


def test_fashion_missing_files_message(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*data\.root"):
        load_split(cfg(name="fashion_mnist", root=str(tmp_path)), "train")


# ------------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------------


def test_synthetic_deterministic_prefix_stable_and_balanced():
    a_img, a_lab = make_synthetic(2100, image_size=16, num_classes=7, seed=3)
    b_img, b_lab = make_synthetic(1500, image_size=16, num_classes=7, seed=3)
    assert a_img.shape == (2100, 3, 16, 16) and a_img.dtype == torch.uint8 and a_lab.dtype == torch.int64
    assert torch.equal(a_img[:1500], b_img) and torch.equal(a_lab[:1500], b_lab)
    c_img, _ = make_synthetic(1500, image_size=16, num_classes=7, seed=4)
    t_img, _ = make_synthetic(1500, image_size=16, num_classes=7, seed=3, split="test")
    assert not torch.equal(c_img, b_img) and not torch.equal(t_img, b_img)
    counts = torch.bincount(b_lab, minlength=7)
    assert int(counts.max() - counts.min()) <= 2  # balanced: at most one cut block per chunk


def test_synthetic_knn_above_chance_and_config():
    c = cfg(name="synthetic", n_train=600, n_test=200, num_classes=10, seed=0, image_size=32, subset=0)
    tr, trl = load_split(c, "train")
    te, tel = load_split(c, "test")
    assert tr.shape == (600, 3, 32, 32) and te.shape == (200, 3, 32, 32)
    assert dataset_size(c, "train") == 600 and dataset_size(c, "test") == 200 and num_classes(c) == 10
    assert dataset_size(cfg(name="synthetic", n_train=600, subset=50)) == 50
    a = F.normalize(tr.flatten(1).float() - 128, dim=1)
    b = F.normalize(te.flatten(1).float() - 128, dim=1)
    pred = trl[(b @ a.T).argmax(dim=1)]
    assert (pred == tel).float().mean() > 0.5  # chance is 0.1


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError):
        load_split(cfg(name="imagenet"), "train")
    with pytest.raises(ValueError):
        dataset_size(cfg(name="synthetic"), "val")


# ------------------------------------------------------------------------------------------------------
# augmentations
# ------------------------------------------------------------------------------------------------------


def _img(seed=0, size=28):
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_random_resized_crop_deterministic_and_shaped():
    img = _img()
    out1 = random_resized_crop(img, 32, generator=torch.Generator().manual_seed(5))
    out2 = random_resized_crop(img, 32, generator=torch.Generator().manual_seed(5))
    out3 = random_resized_crop(img, 32, generator=torch.Generator().manual_seed(6))
    assert out1.shape == (3, 32, 32) and out1.dtype == torch.uint8
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    full = random_resized_crop(img, 28, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    assert torch.equal(full, img)  # whole image, same size: identity


def test_crop_params_within_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = G.random_resized_crop_params(20, 30, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30 and h > 0 and w > 0
        assert 0.2 * 600 * 0.8 <= h * w <= 600


def test_box_from_uniforms_places_the_first_fit_else_centres_the_clamped_aspect():
    """The one RandomResizedCrop sampler of both callers, on draws chosen by hand."""
    draws = np.array([[0.0, 0.5, 0.5, 0.0]] * 10)
    # a quarter of a 100 x 100 image at aspect 1: 50 x 50, top at 0.5 of the 51 places, left at the first
    assert box_from_uniforms(100, 100, 0.25, 0.25, 0.0, 0.0, 1.0, 1.0, draws) == (25, 0, 50, 50)
    # aspect 4 at full area never fits: the centred full-width box with the aspect clamped to r_lo = 4
    log4 = math.log(4.0)
    assert box_from_uniforms(100, 100, 1.0, 1.0, log4, log4, 4.0, 4.0, draws) == (37, 0, 25, 100)
    # the probe's path (torch draws) gives what the sampler gives on those same draws
    g = torch.Generator().manual_seed(3)
    tries, pos = torch.rand(10, 2, generator=g), torch.rand(2, generator=g)
    mine = np.concatenate([tries.numpy(), np.broadcast_to(pos.numpy(), (10, 2))], axis=1).astype(np.float64)
    expected = box_from_uniforms(20, 30, 0.2, 1.0, math.log(3 / 4), math.log(4 / 3), 3 / 4, 4 / 3, mine)
    got = G.random_resized_crop_params(20, 30, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    assert got == expected


def test_dataset_crop_is_function_of_seed_epoch_index():
    images, labels = make_synthetic(20, image_size=32, seed=1)
    ds = IndexedImageDataset(images, labels, train=True, seed=11)
    ds2 = IndexedImageDataset(images, labels, train=True, seed=11)
    ds.set_epoch(3)
    ds2.set_epoch(3)
    img, lab, idx = ds[7]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and lab == int(labels[7]) and idx == 7
    ds[2]  # access order must not matter
    assert torch.equal(ds2[7][0], img)
    top, left, h, w, _ = sample_crop(11, 3, 7, 32, 32)  # the box the FFCV decoder draws too
    assert torch.equal(img, G.resize_uint8(images[7][:, top : top + h, left : left + w], 32))
    ds2.set_epoch(4)
    assert not torch.equal(ds2[7][0], img)
    ev = IndexedImageDataset(images, labels, train=False)
    assert torch.equal(ev[7][0], images[7])


def test_color_augment_zero_strength_is_normalisation():
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    aug = BatchColorAugment(mean, std, brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0, blur_p=0)
    out = aug(x, torch.Generator().manual_seed(1))
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.equal(out, eval_transform(x, mean, std))
    torch.testing.assert_close(out, ref)
    assert torch.equal(Normalize(mean, std)(x), out)


def test_grey_stays_grey_under_colour_jitter():
    grey = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)).expand(-1, 3, -1, -1)
    for kw in (dict(saturation=0.9, brightness=0, contrast=0, hue=0), dict(hue=0.5), {}):
        aug = BatchColorAugment((0.0,) * 3, (1.0,) * 3, grayscale_p=0, **kw)
        out = aug(grey, torch.Generator().manual_seed(2))
        torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[:, 0], out[:, 2], atol=1e-6, rtol=0)
    sat = BatchColorAugment((0.0,) * 3, (1.0,) * 3, brightness=0, contrast=0, hue=0, saturation=0.9, grayscale_p=0)
    torch.testing.assert_close(sat(grey, torch.Generator().manual_seed(3)), grey, atol=1e-6, rtol=0)


def test_single_ops_match_torchvision():
    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    f = torch.linspace(0.6, 1.4, 6)
    h = torch.linspace(-0.45, 0.45, 6)
    for mine, ref, p in (
        (C.adjust_brightness, TF.adjust_brightness, f),
        (C.adjust_contrast, TF.adjust_contrast, f),
        (C.adjust_saturation, TF.adjust_saturation, f),
        (C.adjust_hue, TF.adjust_hue, h),
    ):
        want = torch.stack([ref(x[i], float(p[i])) for i in range(6)])
        torch.testing.assert_close(mine(x.clone(), p), want, atol=2e-4, rtol=0)
    torch.testing.assert_close(C.hsv_to_rgb(C.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    sig = torch.linspace(0.1, 2.0, 6)
    want = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(sig[i])] * 2) for i in range(6)])
    torch.testing.assert_close(C.gaussian_blur(x, sig, 5), want, atol=1e-5, rtol=0)


def test_color_augment_deterministic_and_world_size_invariant():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchColorAugment((0.5,) * 3, (0.25,) * 3, blur_p=0.5, grayscale_p=0.3, jitter_p=0.8)
    full = aug(x, batch_generator(9, 1, 2))
    assert torch.equal(full, aug(x, batch_generator(9, 1, 2)))
    assert not torch.equal(full, aug(x, batch_generator(9, 1, 3)))
    halves = [aug(x[r * 4 : (r + 1) * 4], batch_generator(9, 1, 2), row_offset=r * 4, rows_total=8) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), full, atol=1e-6, rtol=0)
    assert not torch.equal(full, eval_transform(x, (0.5,) * 3, (0.25,) * 3))
    with pytest.raises(ValueError):
        aug(x, torch.Generator(), row_offset=4, rows_total=8)


def _per_sample_reference(aug: BatchColorAugment, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each sample on its own, its ops in its own order: what the batched, sync-free forward must equal."""
    params = aug.sample_params(x.shape[0], gen)
    fns = [(C.adjust_brightness, "brightness", aug.brightness), (C.adjust_contrast, "contrast", aug.contrast),
           (C.adjust_saturation, "saturation", aug.saturation), (C.adjust_hue, "hue", aug.hue)]
    out = []
    for i in range(x.shape[0]):
        xi = C.to_float01(x[i : i + 1])
        for op in params["order"][i].tolist():
            fn, key, strength = fns[op]
            if params["jitter"][i] and strength > 0:
                xi = fn(xi, params[key][i : i + 1])
        if params["gray"][i] and aug.grayscale_p > 0:
            xi = C.rgb_to_gray(xi).expand(-1, 3, -1, -1)
        if params["blur"][i] and aug.blur_p > 0:
            k = max(3, int(round(aug.blur_kernel_frac * x.shape[-1])) // 2 * 2 + 1)
            xi = C.gaussian_blur(xi, params["sigma"][i : i + 1], k)
        out.append(C.normalize(xi, aug.mean, aug.std))
    return torch.cat(out)


@pytest.mark.parametrize("select_rows", [True, False], ids=["cpu-rows", "accelerator-where"])
@pytest.mark.parametrize("kw", [dict(), dict(hue=0.0), dict(contrast=0.0, saturation=0.0), dict(brightness=0.0),
                                dict(jitter_p=0.0, blur_p=0.5)])
def test_batched_color_augment_equals_per_sample_ops(kw: dict, select_rows: bool) -> None:
    """Both batched forms (rows selected per op on the CPU; sync-free torch.where on accelerators)."""
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchColorAugment((0.5,) * 3, (0.25,) * 3, **{"jitter_p": 0.8, "grayscale_p": 0.3, "blur_p": 0.5, **kw})
    aug.select_rows = select_rows
    got = aug(x, torch.Generator().manual_seed(4))
    want = _per_sample_reference(aug, x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_color_augment_from_config_and_grayscale():
    c = cfg(name="synthetic", augment=dict(brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=1.0,
                                           flip=True)).augment
    aug = BatchColorAugment.from_config(c, (0.0,) * 3, (1.0,) * 3)
    assert aug.grayscale_p == 1.0 and aug.blur_p == 0.0
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = aug(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, C.rgb_to_gray(x).expand(-1, 3, -1, -1))


# ------------------------------------------------------------------------------------------------------
# DataLoader path
# ------------------------------------------------------------------------------------------------------


def _collect(loader):
    return [(im.clone(), lab.clone(), idx.clone()) for im, lab, idx in loader]


def test_train_loader_follows_order_and_resumes():
    images, labels = make_synthetic(50, image_size=16, seed=2)
    ds = IndexedImageDataset(images, labels, train=True, seed=5)
    order = EpochOrder(50, 12, seed=5)
    for world in (1, 2):
        for rank in range(world):
            batches = _collect(build_train_loader(ds, order, 1, 0, rank, world, num_workers=0))
            assert len(batches) == 4
            for b, (im, lab, idx) in enumerate(batches):
                assert torch.equal(idx, order.local_indices(1, b, rank, world))
                assert im.shape == (12 // world, 3, 16, 16) and im.dtype == torch.uint8
                assert torch.equal(lab, labels[idx])
                assert torch.equal(im[0], ds[int(idx[0])][0])
    full = _collect(build_train_loader(ds, order, 1, 0, 0, 1, num_workers=0))
    tail = _collect(build_train_loader(ds, order, 1, 3, 0, 1, num_workers=0))
    assert len(tail) == 1 and torch.equal(tail[0][0], full[3][0]) and torch.equal(tail[0][2], full[3][2])
    other_epoch = _collect(build_train_loader(ds, order, 2, 0, 0, 1, num_workers=0))
    assert not torch.equal(other_epoch[0][2], full[0][2])
    assert len(build_train_loader(ds, order, 1, 4, 0, 1, num_workers=0)) == 0


def test_train_loader_workers_match_single_process():
    images, labels = make_synthetic(40, image_size=16, seed=2)
    ds = IndexedImageDataset(images, labels, train=True, seed=5, flip=True)
    order = EpochOrder(40, 8, seed=1)
    a = _collect(build_train_loader(ds, order, 0, 1, 1, 2, num_workers=0))
    b = _collect(build_train_loader(ds, order, 0, 1, 1, 2, num_workers=2))
    assert len(a) == len(b) == 4
    for (ia, la, xa), (ib, lb, xb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(xa, xb)
