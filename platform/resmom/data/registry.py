"""Facts about each dataset that training and probes need."""

from __future__ import annotations

from dataclasses import dataclass

from resmom.data import digits


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_INFO = {"digits": DatasetInfo(digits.NUM_CLASSES, digits.MEAN, digits.STD)}
