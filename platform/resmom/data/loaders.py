"""FFCV loaders for training (two views) and evaluation (sharded, in order).

FFCV decodes each image once into a fixed-size uint8 NCHW batch; the two
training views are then made as batched tensor operations on the training
device (`resmom.data.augment`). Which decoder runs depends on what the
`.beton` stores:

- every image the same size (raw digits, CIFAR, STL-10, Tiny-ImageNet):
  the image as stored, pixel for pixel;
- sizes that vary (JPEG storage of ImageFolder trees): the whole image
  resized to a square a little larger than the training crop, so that the
  random crops on the device still choose from the whole image.

Evaluation decodes a center crop of `crop_fraction` of the short side,
resized to the training resolution, or the stored image when it already has
that size.

Every loader checks the `.beton` against its manifest (and, when given, the
expected conversion options) before FFCV opens it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ffcv.fields.basics import FloatDecoder, IntDecoder
from ffcv.fields.rgb_image import (
    CenterCropRGBImageDecoder,
    ResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from resmom.data.augment import TwoViewAugment
from resmom.data.beton import ConversionOptions, check_beton, sample_indices

# Side of the decoded square over the crop side for variable-size images: the
# ImageNet convention of resizing to 256 before cropping 224.
_DECODE_MARGIN = 256 / 224


def _whole_image(height, width, scale, ratio):
    return 0, 0, height, width


class WholeImageDecoder(ResizedCropRGBImageDecoder):
    """Decode the whole image and resize it to `output_size`, ignoring its aspect ratio.

    FFCV's resized-crop decoders accept images of any size. Taking the whole
    image as the crop keeps every pixel available to the random crops that
    follow on the device.
    """

    def __init__(self, output_size: tuple[int, int]) -> None:
        super().__init__(output_size)
        self.scale = None
        self.ratio = 1.0

    @property
    def get_crop_generator(self):
        return _whole_image


def _is_fixed_size(manifest: dict[str, Any]) -> bool:
    return manifest["resolution"]["min"] == manifest["resolution"]["max"]


def _pipelines(decoder, device: torch.device, with_aspect: bool) -> dict[str, list | None]:
    """Return the image and label pipelines, and the aspect ratio's when `with_aspect`."""
    pipelines: dict[str, list | None] = {
        "image": [decoder, ToTensor(), ToTorchImage()],
        "label": [IntDecoder(), ToTensor(), Squeeze()],
        "aspect": [FloatDecoder(), ToTensor(), Squeeze()] if with_aspect else None,
    }
    if device.type == "cuda":
        for pipeline in pipelines.values():
            if pipeline is not None:
                pipeline.append(ToDevice(device, non_blocking=True))
    return pipelines


def train_decode_size(manifest: dict[str, Any], resolution: int | None) -> int | None:
    """Return the side of the square that training decodes to, or None for images as stored."""
    if _is_fixed_size(manifest):
        return None
    if resolution is None:
        raise ValueError(
            f"{manifest['source']} contains images of several sizes: pass a resolution"
        )
    return math.ceil(resolution * _DECODE_MARGIN)


def train_loader(
    path: Path,
    batch_per_rank: int,
    seed: int,
    distributed: bool,
    threads: int,
    device: torch.device,
    *,
    resolution: int | None = None,
    split: str = "train",
    expected: ConversionOptions | None = None,
) -> Loader:
    """Shuffled loader of (images, labels, aspect ratios) over `path`.

    Under DDP each rank reads its own shard each epoch.
    The shard order is a function of `seed` and the epoch (FFCV wraps
    torch's DistributedSampler), so a rerun with the same seed reads the same
    batches. The last partial batch is dropped so all ranks step together.

    Args:
        resolution: training crop side; needed when stored sizes vary.
        split: part of the file to read (`train`, or STL-10's `unlabeled`
            and `train+unlabeled`).
        expected: conversion options the file must have been written with.
    """
    manifest = check_beton(path, expected)
    decode_size = train_decode_size(manifest, resolution)
    decoder = (
        SimpleRGBImageDecoder()
        if decode_size is None
        else WholeImageDecoder((decode_size, decode_size))
    )
    return Loader(
        str(path),
        batch_size=batch_per_rank,
        num_workers=threads,
        order=OrderOption.RANDOM,
        distributed=distributed,
        seed=seed,
        indices=sample_indices(manifest, split),
        drop_last=True,
        pipelines=_pipelines(decoder, device, with_aspect=True),
    )


def eval_loader(
    path: Path,
    batch_size: int,
    rank: int,
    world_size: int,
    threads: int,
    device: torch.device,
    *,
    resolution: int | None = None,
    crop_fraction: float = 1.0,
    expected: ConversionOptions | None = None,
) -> Loader:
    """In-order loader over every `world_size`-th labeled sample starting at `rank`.

    Nothing is dropped and nothing is augmented. Unlabeled images (STL-10)
    are skipped, so the kNN bank and the probes see labeled images only.

    Args:
        resolution: output side; None keeps the stored size (all images must have one size).
        crop_fraction: share of the short side kept by the center crop.
    """
    manifest = check_beton(path, expected)
    labeled = sample_indices(manifest, "labeled")
    if labeled is None:
        labeled = np.arange(manifest["count"], dtype=np.uint64)
    stored = manifest["resolution"]["max"]
    if _is_fixed_size(manifest) and resolution in (None, stored[0]) and stored[0] == stored[1]:
        decoder = SimpleRGBImageDecoder()
    elif resolution is None:
        raise ValueError(
            f"{manifest['source']} contains images of several sizes: pass a resolution"
        )
    else:
        decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_fraction)
    return Loader(
        str(path),
        batch_size=batch_size,
        num_workers=threads,
        order=OrderOption.SEQUENTIAL,
        # FFCV 1.0.2 only accepts uint64 indices here.
        indices=labeled[rank::world_size].astype(np.uint64),
        drop_last=False,
        pipelines=_pipelines(decoder, device, with_aspect=False),
    )


# NOTE: FFCV 1.0.2 runs its pipeline in a background thread, and an exception
# there (a numba typing error, a corrupt sample) leaves the consumer waiting
# forever instead of raising. Checking files against their manifests before
# loading avoids the known causes; a watchdog around `next()` would fix the rest.


def keep_torch_threads(loader: Iterable) -> Iterator:
    """Iterate `loader` with the torch thread count that was set before the epoch started.

    FFCV 1.0.2 sets torch's intra-op thread count to the loader's
    `num_workers` whenever an epoch starts, which would leave the model and
    the augmentation on `data.loader_threads` threads.
    """
    threads = torch.get_num_threads()
    iterator = iter(loader)
    torch.set_num_threads(threads)
    yield from iterator


class TwoViewBatches:
    """Iterate (view_a, view_b, labels) batches: FFCV decode, then batched augmentation.

    The stored aspect ratios go to the augmentation, so that crops of images
    decoded into squares keep the proportions of the original image.
    """

    def __init__(self, loader: Loader, augment: TwoViewAugment) -> None:
        self.loader = loader
        self.augment = augment

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, aspects in keep_torch_threads(self.loader):
            view_a, view_b = self.augment(images, aspects)
            yield view_a, view_b, labels
