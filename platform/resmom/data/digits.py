"""scikit-learn's handwritten digits as 32x32 RGB images with a stratified split.

The set ships inside scikit-learn (1,797 real 8x8 scans, 10 classes, pixel
values 0..16), so the main job trains on real images with no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from resmom.data.registry import DATASET_INFO

NUM_CLASSES = DATASET_INFO["digits"].num_classes
RESOLUTION = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MEAN = DATASET_INFO["digits"].mean
STD = DATASET_INFO["digits"].std


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64


def _to_rgb32(pixels: np.ndarray) -> np.ndarray:
    """Scale (N, 64) digits in 0..16 to (N, 32, 32, 3) uint8 with bilinear upsampling."""
    small = torch.from_numpy(pixels.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    large = F.interpolate(
        small, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False
    )
    gray = (large.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 1, 32, 32)
    return gray.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def digits_splits() -> dict[str, Split]:
    """Return the `train` and `test` splits, stratified by class with a fixed seed."""
    bunch = load_digits()
    images = _to_rgb32(bunch.data)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {
        "train": Split(images[train_idx], labels[train_idx]),
        "test": Split(images[test_idx], labels[test_idx]),
    }
