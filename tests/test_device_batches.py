"""data.format=device: batches cut from the resident uint8 images equal the torchvision loader's, batch for batch
(same samples, same boxes, same flips, same pixels), for any rank, world size and resume position."""

from __future__ import annotations

import pytest
import torch
from composed import compose_config

from invprop.config import ConfigError, validate
from invprop.data.device_batches import DeviceBatches
from invprop.data.loader import IndexedImageDataset, build_train_loader
from invprop.data.order import EpochOrder

N, BATCH, SEED = 200, 24, 7


def images_and_labels(channels: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, channels, size, size), dtype=torch.uint8, generator=gen)
    images[:, :, :3] = 0  # flat borders, like Fashion-MNIST's padding
    return images, torch.randint(0, 10, (N,), generator=gen)


@pytest.mark.parametrize(("channels", "scale", "flip"), [(3, (0.2, 1.0), True), (1, (0.35, 1.0), False)])
@pytest.mark.parametrize(("rank", "world", "start"), [(0, 1, 0), (1, 2, 3)])
def test_equal_to_the_torchvision_loader(channels: int, scale: tuple[float, float], flip: bool, rank: int,
                                         world: int, start: int) -> None:
    images, labels = images_and_labels(channels)
    order = EpochOrder(N, BATCH, seed=SEED)
    dataset = IndexedImageDataset(images, labels, train=True, seed=SEED, crop_scale=scale, flip=flip)
    resident = DeviceBatches(images, labels, order, seed=SEED, out_size=32, crop_scale=scale, flip=flip)
    for epoch in (0, 2):
        want = list(build_train_loader(dataset, order, epoch, start, rank, world, num_workers=0))
        got = list(resident.epoch(epoch, start, rank, world))
        assert len(got) == len(want) == order.num_batches - start
        for (x, y, i), (wx, wy, wi) in zip(got, want, strict=True):
            assert torch.equal(i, wi) and torch.equal(y, wy)
            assert x.dtype == torch.uint8 and torch.equal(x, wx)


def test_flips_and_crops_happen() -> None:
    """The equality above is not the trivial one: boxes vary, some are enlarged, and flips are drawn."""
    images, labels = images_and_labels()
    resident = DeviceBatches(images, labels, EpochOrder(N, BATCH, seed=SEED), seed=SEED, out_size=32,
                             crop_scale=(0.2, 1.0), flip=True)
    boxes, flips = resident.boxes(0, torch.arange(N))
    assert (boxes[:, 2] < 32).float().mean() > 0.5 and 0.2 < flips.float().mean() < 0.8
    plain = DeviceBatches(images, labels, EpochOrder(N, BATCH, seed=SEED), seed=SEED, out_size=32,
                          crop_scale=(0.2, 1.0), flip=False)
    assert not plain.boxes(0, torch.arange(N))[1].any()


def test_images_larger_than_the_output_are_refused() -> None:
    images, labels = images_and_labels(size=40)
    with pytest.raises(ValueError, match="no larger than the 32-px output; these are 40x40: use data.format=ffcv"):
        DeviceBatches(images, labels, EpochOrder(N, BATCH, seed=0), seed=0, out_size=32, crop_scale=(0.2, 1.0))


def test_image_folders_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="^data.format=device holds the whole training set on the device, .* "
                                          "not data=folder's image files: use data.format=ffcv or torchvision$"):
        validate(compose_config("data=folder", "data.root=/tmp", "data.format=device"))
    validate(compose_config("data=synthetic", "data.format=device"))


def test_batched_boxes_equal_the_per_sample_ones() -> None:
    from invprop.data.crop import sample_crop, sample_crops

    indices = torch.randperm(500)[:64]
    batched = sample_crops(3, 5, indices.numpy(), 28, 40, (0.2, 1.0), (0.5, 2.0))
    assert [tuple(row) for row in batched.tolist()] == [
        tuple(int(v) for v in sample_crop(3, 5, int(i), 28, 40, (0.2, 1.0), (0.5, 2.0))) for i in indices]
