"""The data group's schema: what every data set has, and each kind's own keys (see schema.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from invprop.config.checks import ConfigError, check_choice, check_int, check_number, check_positive_int

# Pixels per side above which one training batch no longer fits any machine's memory (ImageNet trains at 224).
MAX_IMAGE_SIZE = 2048


@dataclass
class AugmentConfig:
    crop_scale: list[float]
    flip: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_p: float
    grayscale_p: float
    blur_p: float

    def validate(self) -> None:
        scale = list(self.crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"data.augment.crop_scale={scale} must be [low, high] with 0 < low <= high <= 1 "
                              "(shares of the image area)")
        for key in ("brightness", "contrast", "saturation"):
            check_number(getattr(self, key), f"data.augment.{key}", 0)
        check_number(self.hue, "data.augment.hue", 0, 0.5)
        for key in ("jitter_p", "grayscale_p", "blur_p"):
            check_number(getattr(self, key), f"data.augment.{key}", 0, 1)


class DataFormat(StrEnum):
    """`data.format`: which loader feeds training (invprop/data/sources.py builds it)."""

    ffcv = "ffcv"
    torchvision = "torchvision"
    device = "device"


@dataclass
class DataConfig:
    """What every data set has; each `data=` option adds its own keys."""

    name: str
    root: str | None
    subset: int
    image_size: int
    format: DataFormat
    beton_dir: str
    eval_split: str
    mean: list[float] | None   # per-channel statistics in [0, 1] units; null = the data set's own
    std: list[float] | None
    augment: AugmentConfig

    def validate(self) -> None:
        check_int(self.subset, "data.subset", 0, " (0 = the whole training set)")
        check_int(self.image_size, "data.image_size", 8, " (pixels per side)")
        if self.image_size > MAX_IMAGE_SIZE:  # else the first batch fails deep in an allocation
            raise ConfigError(f"data.image_size={self.image_size} is larger than {MAX_IMAGE_SIZE} pixels per side; "
                              f"use at most {MAX_IMAGE_SIZE} (the ImageNet recipes train at 224)")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
                raise ConfigError(f"data.{key}={list(value)} must be three per-channel values (RGB)"
                                  f"{', each > 0' if key == 'std' else ''}, or null for the data set's own")
        self.augment.validate()


@dataclass
class SmallImagesConfig(DataConfig):
    """Images smaller than the network's input: Fashion-MNIST's 28 px, the synthetic set."""

    resize_mode: str

    def validate(self) -> None:
        super().validate()
        check_choice(self.resize_mode, "data.resize_mode", ("pad", "resize"))


@dataclass
class SyntheticConfig(SmallImagesConfig):
    n_train: int
    n_test: int
    num_classes: int
    seed: int
    noise: float

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.n_train, "data.n_train")
        check_positive_int(self.n_test, "data.n_test")
        check_int(self.num_classes, "data.num_classes", 2)


@dataclass
class ImageFolderConfig(DataConfig):
    """JPEG trees (ImageNet, any ImageFolder-style folder)."""

    beton_mode: str
    beton_max_resolution: int
    beton_jpeg_quality: int
    eval_crop_ratio: float
    eval_workers: int

    def validate(self) -> None:
        super().validate()
        if self.format == DataFormat.device:
            raise ConfigError(f"data.format=device holds the whole training set on the device, which suits "
                              f"in-memory data sets (fashion_mnist, cifar10, cifar100, synthetic), not data="
                              f"{self.name}'s image files: use data.format=ffcv or torchvision")
        check_choice(self.beton_mode, "data.beton_mode", ("jpg", "raw"))
        check_positive_int(self.beton_max_resolution, "data.beton_max_resolution")
        check_int(self.beton_jpeg_quality, "data.beton_jpeg_quality", 1)
        check_number(self.eval_crop_ratio, "data.eval_crop_ratio", 0, 1, low_open=True)
        check_int(self.eval_workers, "data.eval_workers", 0)
