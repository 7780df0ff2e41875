"""FFCV loaders for training (two views) and evaluation (sharded, in order).

Both loaders decode with the same FFCV pipeline (full image, uint8, NCHW),
so the numba code that FFCV compiles on a loader's first pass is the same
for all of them. Augmentation runs afterwards as batched tensor operations
(`resmom.data.augment`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from resmom.data.augment import TwoViewAugment


def _pipelines(device: torch.device) -> dict[str, list]:
    image = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()]
    label = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        image.append(ToDevice(device, non_blocking=True))
        label.append(ToDevice(device, non_blocking=True))
    return {"image": image, "label": label}


def train_loader(
    path: Path,
    batch_per_rank: int,
    seed: int,
    distributed: bool,
    threads: int,
    device: torch.device,
) -> Loader:
    """Shuffled loader over `path`; under DDP each rank reads its own shard each epoch.

    The shard order is a function of `seed` and the epoch (FFCV wraps
    torch's DistributedSampler), so a rerun with the same seed reads the same
    batches. The last partial batch is dropped so all ranks step together.
    """
    return Loader(
        str(path),
        batch_size=batch_per_rank,
        num_workers=threads,
        order=OrderOption.RANDOM,
        distributed=distributed,
        seed=seed,
        drop_last=True,
        pipelines=_pipelines(device),
    )


def eval_loader(
    path: Path, batch_size: int, rank: int, world_size: int, threads: int, device: torch.device
) -> Loader:
    """In-order loader over every `world_size`-th sample starting at `rank`, nothing dropped."""
    from ffcv.reader import Reader

    count = Reader(str(path)).num_samples
    return Loader(
        str(path),
        batch_size=batch_size,
        num_workers=threads,
        order=OrderOption.SEQUENTIAL,
        indices=np.arange(rank, count, world_size, dtype=np.uint64),
        drop_last=False,
        pipelines=_pipelines(device),
    )


# NOTE: FFCV 1.0.2 runs its pipeline in a background thread, and an exception
# there (a numba typing error, a corrupt sample) leaves the consumer waiting
# forever instead of raising. Checking files against their manifests before
# loading avoids the known causes; a watchdog around `next()` would fix the rest.


class TwoViewBatches:
    """Iterate (view_a, view_b, labels) batches: FFCV decode, then batched augmentation."""

    def __init__(self, loader: Loader, augment: TwoViewAugment) -> None:
        self.loader = loader
        self.augment = augment

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            view_a, view_b = self.augment(images)
            yield view_a, view_b, labels
