"""Facts about each dataset that conversion, training and probes need.

This module imports neither torch nor FFCV, so that spec validation can use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

IMAGEFOLDER_PREFIX = "imagefolder:"

# Mean and std of ImageNet-1k training images in [0, 1], the values that
# torchvision's pretrained models are normalized with. STL-10 and
# Tiny-ImageNet are drawn from ImageNet, so they use them too.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Class count, normalization and the default storage and crop sizes of one dataset."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resolution: int  # default side of the training crops
    write_mode: Literal["raw", "jpg"]  # default storage in the `.beton`
    max_resolution: int | None  # default maximum stored side; None keeps the source size
    # Fraction of the short side that the evaluation center crop keeps:
    # 0.875 is the ImageNet convention (resize to 256, crop 224).
    eval_crop_fraction: float = 1.0


DATASET_INFO = {
    # Per-channel statistics of the 32x32 digits training split in [0, 1] (all
    # three channels are equal); computed once with `digits_splits()`, split seed 0.
    "digits": DatasetInfo(10, (0.3054,) * 3, (0.3237,) * 3, 32, "raw", None),
    # Per-channel mean and population std over all pixels of the 50,000
    # training images. The often-copied CIFAR-10 std (0.2023, 0.1994, 0.2010)
    # is a mean of per-image stds, not this.
    "cifar10": DatasetInfo(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, "raw", None),
    "cifar100": DatasetInfo(
        100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, "raw", None
    ),
    "stl10": DatasetInfo(10, _IMAGENET_MEAN, _IMAGENET_STD, 96, "raw", None),
    "tinyimagenet": DatasetInfo(200, _IMAGENET_MEAN, _IMAGENET_STD, 64, "raw", None),
    "imagenet100": DatasetInfo(100, _IMAGENET_MEAN, _IMAGENET_STD, 224, "jpg", 256, 0.875),
    "imagenet": DatasetInfo(1000, _IMAGENET_MEAN, _IMAGENET_STD, 224, "jpg", 256, 0.875),
}
# Any ImageFolder tree: the class count comes from the manifest of its `.beton`.
IMAGEFOLDER_INFO = DatasetInfo(0, _IMAGENET_MEAN, _IMAGENET_STD, 224, "jpg", 256, 0.875)

DATASETS = tuple(DATASET_INFO)
# Datasets that need a class-list file (one class folder name per line).
NEEDS_CLASS_LIST = ("imagenet100",)


def is_known_dataset(name: str) -> bool:
    """Check that `name` is a registered dataset or `imagefolder:PATH` with a non-empty PATH."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        return bool(name.removeprefix(IMAGEFOLDER_PREFIX))
    return name in DATASET_INFO


def dataset_info(name: str, num_classes: int | None = None) -> DatasetInfo:
    """Return the facts about dataset `name`; `num_classes` fills in an ImageFolder's count.

    Raises:
        KeyError: `name` is not a known dataset.
    """
    if name.startswith(IMAGEFOLDER_PREFIX):
        info = IMAGEFOLDER_INFO
        if num_classes is not None:
            info = DatasetInfo(
                num_classes, info.mean, info.std, info.resolution, info.write_mode,
                info.max_resolution, info.eval_crop_fraction,
            )  # fmt: skip
        return info
    return DATASET_INFO[name]


def dataset_folder(name: str) -> str:
    """Return the folder name under the data folder that contains the `.beton` files of `name`.

    An `imagefolder:PATH` dataset gets the last part of PATH plus a hash of
    the whole PATH, so that two trees with the same folder name do not collide.
    """
    if not name.startswith(IMAGEFOLDER_PREFIX):
        return name
    path = name.removeprefix(IMAGEFOLDER_PREFIX)
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in PurePath(path).name)
    return f"imagefolder-{stem or 'root'}-{digest}"
