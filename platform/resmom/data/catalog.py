"""Dataset readers by name, and the torchvision downloaders of the datasets that have one."""

from __future__ import annotations

import logging
from pathlib import Path

from resmom.data import digits, sources
from resmom.data.registry import DATASET_INFO, IMAGEFOLDER_PREFIX, NEEDS_CLASS_LIST
from resmom.data.sources import ArraySource, DataError, Source

log = logging.getLogger(__name__)

# The folders that `--source` contains for each dataset, named in error
# messages. The README's dataset table lists the files inside them.
_SOURCE_LAYOUTS = {
    "cifar10": "cifar-10-batches-py/",
    "cifar100": "cifar-100-python/",
    "stl10": "stl10_binary/",
    "tinyimagenet": "tiny-imagenet-200/",
    "imagenet": "train/<class>/ and val/<class>/",
    "imagenet100": "train/<class>/ and val/<class>/",
}
# torchvision's dataset classes that download each format; the others are
# downloaded by hand (ImageNet needs a login, Tiny-ImageNet has no torchvision class).
_DOWNLOADERS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


def _digits() -> dict[str, Source]:
    classes = tuple(str(digit) for digit in range(digits.NUM_CLASSES))
    return {
        name: ArraySource(
            split.images, split.labels, classes, f"sklearn.datasets.load_digits {name}"
        )
        for name, split in digits.digits_splits().items()
    }


def read_dataset(
    name: str, source: Path | None, classes_file: Path | None = None
) -> dict[str, Source]:
    """Return the `train` and `test` sources of dataset `name` read from `source`.

    Raises:
        DataError: the name is unknown, a needed path is missing, or a file is corrupt.
    """
    if name == "digits":
        return _digits()
    if name.startswith(IMAGEFOLDER_PREFIX):
        return sources.read_imagefolder(Path(name.removeprefix(IMAGEFOLDER_PREFIX)))
    if name not in DATASET_INFO:
        raise DataError(
            f"unknown dataset {name!r}; accepted: {', '.join(DATASET_INFO)}, imagefolder:PATH"
        )
    if source is None:
        raise DataError(
            f"{name} is not prepared; convert it with `rmctl data prepare {name} --source PATH`"
        )
    if not source.is_dir():
        raise DataError(
            f"source folder not found: {source}; --source must be an existing folder that "
            f"contains {_SOURCE_LAYOUTS[name]}"
        )
    if name in NEEDS_CLASS_LIST:
        if classes_file is None:
            raise DataError(f"{name} needs a class-list file: pass --classes FILE")
        return sources.read_imagefolder(source, sources.read_class_list(classes_file))
    readers = {
        "cifar10": sources.read_cifar10,
        "cifar100": sources.read_cifar100,
        "stl10": sources.read_stl10,
        "tinyimagenet": sources.read_tinyimagenet,
        "imagenet": sources.read_imagefolder,
    }
    return readers[name](source)


def download(name: str, source: Path) -> None:
    """Download dataset `name` into `source` with torchvision's dataset class.

    Raises:
        DataError: torchvision has no downloader for `name`, or the download failed.
    """
    if name not in _DOWNLOADERS:
        raise DataError(
            f"--download supports {', '.join(_DOWNLOADERS)}; place the files of {name} "
            "under --source by hand"
        )
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, _DOWNLOADERS[name])
    source.mkdir(parents=True, exist_ok=True)
    splits = (
        [{"split": "train+unlabeled"}, {"split": "test"}]
        if name == "stl10"
        else [{"train": True}, {"train": False}]
    )
    log.info("downloading %s into %s with torchvision", name, source)
    for arguments in splits:
        try:
            dataset_class(root=str(source), download=True, **arguments)
        except Exception as exc:  # noqa: BLE001 - network, checksum or disk failures alike
            raise DataError(
                f"download of {name} into {source} failed ({type(exc).__name__}: {exc}); "
                "without a network, copy the files that torchvision downloads into --source"
            ) from exc
