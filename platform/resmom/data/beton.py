"""Write datasets into FFCV `.beton` files atomically, each with a manifest beside it.

A `.beton` is trusted only when its manifest exists and agrees with the file.
The writer renames the finished file into place first and the manifest last.
An interrupted conversion therefore leaves either nothing or a `.beton`
without a manifest, which `check_beton` rejects and `prepare` rewrites.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from resmom.data import digits

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
MANIFEST_SUFFIX = ".manifest.json"


class DataError(RuntimeError):
    """A dataset file that is missing, stale or corrupt; the message names the fix."""


@dataclass(frozen=True)
class ArrayDataset:
    """Indexable (image, label) pairs in the form `ffcv.writer.DatasetWriter` reads."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def beton_path(data_dir: Path, dataset: str, split: str) -> Path:
    return data_dir / dataset / f"{split}.beton"


def manifest_path(beton: Path) -> Path:
    return beton.with_name(beton.name + MANIFEST_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    # FFCV's writer processes hang instead of failing when a sample is
    # malformed, so shapes and types are checked before any process starts.
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),):
        raise DataError(f"labels must be ({len(images)},), got {labels.shape}")


def write_beton(
    path: Path, images: np.ndarray, labels: np.ndarray, source: str, workers: int = 1
) -> dict[str, Any]:
    """Write an image classification split to `path` with raw RGB storage.

    The file is written under a temporary name in the same folder and renamed
    into place, then its manifest is written the same way.

    Returns:
        The manifest that was written beside the file.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    _check_arrays(images, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path(path).unlink(missing_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    os.close(descriptor)
    try:
        writer = DatasetWriter(
            temporary,
            {
                "image": RGBImageField(write_mode="raw", max_resolution=max(images.shape[1:3])),
                "label": IntField(),
            },
            num_workers=workers,
        )
        writer.from_indexed_dataset(ArrayDataset(images, labels))
        manifest = {
            "source": source,
            "count": int(len(labels)),
            "classes": sorted(int(c) for c in np.unique(labels)),
            "resolution": [int(images.shape[1]), int(images.shape[2])],
            "write_mode": "raw",
            "sha256": _sha256(Path(temporary)),
            "versions": {name: version(name) for name in ("ffcv", "numpy", "resmom")},
        }
        # mkstemp creates the file readable by its owner only; a shared data
        # folder needs the usual permissions.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _write_json_atomic(manifest_path(path), manifest)
    return manifest


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(temporary, path)


def check_beton(path: Path, verify_checksum: bool = False) -> dict[str, Any]:
    """Return the manifest of `path` after checking that the file matches it.

    Raises:
        DataError: the file or its manifest is missing, or they disagree.
    """
    manifest_file = manifest_path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}; run `rmctl data prepare`")
    if not manifest_file.is_file():
        raise DataError(
            f"{path} has no manifest ({manifest_file.name}), so its conversion did not finish; "
            "run `rmctl data prepare` again"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"corrupt manifest {manifest_file}: {exc}; run `rmctl data prepare`"
        ) from exc
    if verify_checksum and _sha256(path) != manifest.get("sha256"):
        raise DataError(
            f"{path} does not match the checksum in its manifest; run `rmctl data prepare`"
        )
    return manifest


# Each entry returns {split: (images, labels)} for one dataset name.
_SOURCES: dict[str, Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]]] = {
    "digits": lambda: {name: (s.images, s.labels) for name, s in digits.digits_splits().items()},
}


def prepare(dataset: str, data_dir: Path, force: bool = False) -> dict[str, Path]:
    """Convert `dataset` into one `.beton` per split unless valid files already exist.

    Returns:
        The path of each split's `.beton`.
    """
    if dataset not in _SOURCES:
        raise DataError(f"unknown dataset {dataset!r}; accepted: {', '.join(sorted(_SOURCES))}")
    paths = {split: beton_path(data_dir, dataset, split) for split in SPLITS}
    if not force:
        try:
            for path in paths.values():
                check_beton(path)
            return paths
        except DataError:
            pass
    log.info("converting %s into %s", dataset, paths["train"].parent)
    for split, (images, labels) in _SOURCES[dataset]().items():
        manifest = write_beton(paths[split], images, labels, source=f"{dataset}:{split}")
        log.info("wrote %s (%d images)", paths[split], manifest["count"])
    return paths
