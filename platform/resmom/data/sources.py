"""Readers for the on-disk formats of the standard SSL datasets.

Each reader returns `{split: source}` for the splits `train` and `test`. A
source is indexable and returns `(image, label)` with `image` an (H, W, 3)
uint8 RGB array, the form that `ffcv.writer.DatasetWriter` reads. Array
formats (CIFAR pickles, STL-10 binaries) are held in memory or memory-mapped.
Folder formats keep file paths and decode each image with PIL when the
writer requests it, so ImageNet is never loaded whole.

The layouts are the ones torchvision's downloaders leave on disk. Every
reader checks structure (files present, sizes, label ranges) and raises
`DataError` naming the file. `check_source` then decodes every image of a
folder source once, because FFCV's writer processes hang on a bad sample.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

UNLABELED = -1
# The extensions torchvision's ImageFolder accepts; other files are skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# FFCV stores image sides as uint16.
_MAX_SIDE = 65535


class DataError(RuntimeError):
    """A dataset file that is missing, stale or corrupt; the message names the file and the fix."""


@dataclass
class ArraySource:
    """Images held in an array, e.g. a memory map of a binary file.

    `images` is (N, H, W, 3) uint8; a strided view (STL-10's column-major
    layout) is copied one image at a time.
    """

    images: np.ndarray
    labels: np.ndarray  # (N,) int64, UNLABELED for unlabeled images
    classes: tuple[str, ...]
    origin: str
    segments: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.images[index]), int(self.labels[index])


@dataclass
class FileSource:
    """Image files decoded lazily by PIL and converted to RGB.

    Grayscale, CMYK, RGBA (alpha dropped, as torchvision's loader does) and
    palette images all become 3-channel RGB.
    """

    paths: list[str]
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    origin: str
    segments: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Maximum side that the writer will keep. JPEG decoding then skips detail
    # that the resize would drop (PIL's draft mode, a DCT-domain downscale).
    draft_size: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return load_rgb(self.paths[index], self.draft_size), int(self.labels[index])


@dataclass
class ConcatSource:
    """Several sources one after another, e.g. STL-10's labeled and unlabeled images."""

    parts: list[ArraySource | FileSource]
    classes: tuple[str, ...]
    origin: str
    segments: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._starts = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part][index - int(self._starts[part])]


Source = ArraySource | FileSource | ConcatSource


def load_rgb(path: str, draft_size: int | None = None) -> np.ndarray:
    """Decode an image file into an (H, W, 3) uint8 RGB array."""
    with Image.open(path) as image:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        return np.asarray(image.convert("RGB"))


# CIFAR ---------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers only.

    A pickle can call any function it names, so the CIFAR files may name
    only the functions that rebuild numpy arrays, scalars and bytes.
    """

    # Protocol 2 pickles written by Python 3 rebuild bytes with _codecs.encode.
    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        with path.open("rb") as handle:
            payload = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataError(f"{path} is not a readable CIFAR python pickle: {exc}") from exc
    if not isinstance(payload, dict):
        raise DataError(f"{path} contains a {type(payload).__name__}, expected a dict")
    return {
        key.decode() if isinstance(key, bytes) else key: value for key, value in payload.items()
    }


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR pickle into (N, 32, 32, 3) uint8 images and (N,) labels."""
    payload = _load_pickle(path)
    if "data" not in payload or label_key not in payload:
        raise DataError(f"{path} lacks 'data' or '{label_key}'; found keys {sorted(payload)}")
    data = np.asarray(payload["data"])
    labels = np.asarray(payload[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}")
    # Rows are channel-major: 1024 red, then green, then blue values.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _find_folder(root: Path, name: str) -> Path:
    """Return `root/name`, or `root` itself when it is that folder."""
    if (root / name).is_dir():
        return root / name
    if root.name == name and root.is_dir():
        return root
    raise DataError(f"folder {name} not found in {root}; expected torchvision's layout")


def _cifar(
    root: Path, folder: str, train_files: Sequence[str], test_file: str, meta: tuple[str, str, str]
) -> dict[str, Source]:
    meta_file, names_key, label_key = meta
    directory = _find_folder(root, folder)
    names = _load_pickle(directory / meta_file).get(names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{directory / meta_file} lacks the class names '{names_key}'")
    classes = tuple(str(name) for name in names)
    batches = [_cifar_batch(directory / name, label_key, len(classes)) for name in train_files]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    test_images, test_labels = _cifar_batch(directory / test_file, label_key, len(classes))
    return {
        "train": ArraySource(images, labels, classes, f"{directory}/{','.join(train_files)}"),
        "test": ArraySource(test_images, test_labels, classes, str(directory / test_file)),
    }


def read_cifar10(root: Path) -> dict[str, Source]:
    """Read `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) under `root`."""
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    meta = ("batches.meta", "label_names", "labels")
    return _cifar(root, "cifar-10-batches-py", train_files, "test_batch", meta)


def read_cifar100(root: Path) -> dict[str, Source]:
    """Read `cifar-100-python/` (train, test, meta) under `root` with the 100 fine labels."""
    meta = ("meta", "fine_label_names", "fine_labels")
    return _cifar(root, "cifar-100-python", ["train"], "test", meta)


# STL-10 --------------------------------------------------------------------

_STL_SIDE = 96
_STL_RECORD = 3 * _STL_SIDE * _STL_SIDE
_STL_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _stl_images(path: Path) -> np.ndarray:
    """Memory-map an STL-10 `*_X.bin` file as (N, 96, 96, 3) without reading it."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    size = path.stat().st_size
    if size == 0 or size % _STL_RECORD:
        raise DataError(
            f"{path} has {size} bytes, not a positive multiple of {_STL_RECORD} "
            "(one 96x96x3 image); the file is truncated or not an STL-10 binary"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, _STL_SIDE, _STL_SIDE)
    # Each record is channel-major and column-major: raw[n, c, x, y] is
    # pixel (row y, column x), as torchvision's STL10 reads it.
    return raw.transpose(0, 3, 2, 1)


def _stl_labels(path: Path, count: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != count:
        raise DataError(f"{path} has {len(labels)} labels but its images file has {count} images")
    if len(labels) and not (1 <= labels.min() and labels.max() <= len(_STL_CLASSES)):
        raise DataError(f"{path}: labels must be in 1..{len(_STL_CLASSES)}")
    return labels - 1  # stored as 1..10


def read_stl10(root: Path) -> dict[str, Source]:
    """Read `stl10_binary/` under `root`.

    The `train` split contains the 5,000 labeled training images followed by the
    100,000 unlabeled ones (label -1). Its `segments` name the two ranges, so
    training can read either or both from one `.beton`.
    """
    directory = _find_folder(root, "stl10_binary")
    names_file = directory / "class_names.txt"
    classes = _STL_CLASSES
    if names_file.is_file():
        classes = tuple(
            line.strip() for line in names_file.read_text().splitlines() if line.strip()
        )
    split_sources = {}
    for split in ("train", "test"):
        images = _stl_images(directory / f"{split}_X.bin")
        labels = _stl_labels(directory / f"{split}_y.bin", len(images))
        split_sources[split] = ArraySource(
            images, labels, classes, str(directory / f"{split}_X.bin")
        )
    unlabeled_images = _stl_images(directory / "unlabeled_X.bin")
    unlabeled = ArraySource(
        unlabeled_images,
        np.full(len(unlabeled_images), UNLABELED, dtype=np.int64),
        classes,
        str(directory / "unlabeled_X.bin"),
    )
    labeled = split_sources["train"]
    boundary = len(labeled)
    train = ConcatSource(
        [labeled, unlabeled],
        classes,
        f"{labeled.origin},{unlabeled.origin}",
        segments={"train": (0, boundary), "unlabeled": (boundary, boundary + len(unlabeled))},
    )
    return {"train": train, "test": split_sources["test"]}


# Folder trees --------------------------------------------------------------


def _image_files(folder: Path) -> list[str]:
    """Return the image files under `folder`, recursively, in a stable order."""
    found = []
    for directory, _, names in os.walk(folder, followlinks=True):
        found.extend(
            os.path.join(directory, name)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)


def _class_folders(split_dir: Path, classes: Sequence[str] | None) -> dict[str, Path]:
    if not split_dir.is_dir():
        raise DataError(f"folder not found: {split_dir}; expected one subfolder per class")
    present = {path.name: path for path in split_dir.iterdir() if path.is_dir()}
    if classes is None:
        if not present:
            raise DataError(f"{split_dir} has no class subfolders")
        return dict(sorted(present.items()))
    missing = [name for name in classes if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{split_dir} lacks {len(missing)} listed classes: {shown}")
    return {name: present[name] for name in sorted(classes)}


def _folder_split(
    split_dir: Path, class_index: dict[str, int], folders: dict[str, Path]
) -> FileSource:
    paths: list[str] = []
    labels: list[int] = []
    for name, folder in folders.items():
        if name not in class_index:
            raise DataError(f"{folder} is a class that the train split does not have")
        files = _image_files(folder)
        if not files:
            raise DataError(
                f"class folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths.extend(files)
        labels.extend([class_index[name]] * len(files))
    classes = tuple(class_index)
    return FileSource(paths, np.asarray(labels, dtype=np.int64), classes, str(split_dir))


def read_imagefolder(root: Path, classes: Sequence[str] | None = None) -> dict[str, Source]:
    """Read `root/train/<class>/*` and `root/val/<class>/*` (ImageNet's layout).

    Args:
        classes: keep only these class folders (ImageNet-100); all of them when None.
    Returns:
        `train` from `train/`, `test` from `val/`; labels index the sorted class names.
    """
    if not root.is_dir():
        raise DataError(
            f"source folder not found: {root}; expected a folder that contains "
            "train/<class>/ and val/<class>/"
        )
    train_folders = _class_folders(root / "train", classes)
    class_index = {name: index for index, name in enumerate(train_folders)}
    val_folders = _class_folders(root / "val", None)
    if classes is not None:
        val_folders = {name: path for name, path in val_folders.items() if name in class_index}
    return {
        "train": _folder_split(root / "train", class_index, train_folders),
        "test": _folder_split(root / "val", class_index, val_folders),
    }


def read_class_list(path: Path) -> list[str]:
    """Read a class-list file: one class folder name (e.g. a WordNet id) per line."""
    if not path.is_file():
        raise DataError(f"class-list file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"class-list file {path} is empty; expected one class name per line")
    if len(set(names)) != len(names):
        raise DataError(f"class-list file {path} lists a class more than once")
    return names


def read_tinyimagenet(root: Path) -> dict[str, Source]:
    """Read `tiny-imagenet-200/` under `root`: `train/<wnid>/images/*` and the labeled `val/`.

    Returns:
        `train` from `train/`, `test` from `val/` (the official test split has no labels).
    """
    directory = _find_folder(root, "tiny-imagenet-200")
    wnids = read_class_list(directory / "wnids.txt")
    class_index = {name: index for index, name in enumerate(sorted(wnids))}
    train_folders = {name: directory / "train" / name / "images" for name in class_index}
    for folder in train_folders.values():
        if not folder.is_dir():
            raise DataError(f"folder not found: {folder}")
    train = _folder_split(directory / "train", class_index, train_folders)

    annotations = directory / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"missing file {annotations}")
    paths, labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_index:
            raise DataError(
                f"{annotations} line {number}: expected 'FILE<TAB>WNID...' with a WNID "
                f"from wnids.txt, got {line[:80]!r}"
            )
        image = directory / "val" / "images" / fields[0]
        if not image.is_file():
            raise DataError(f"{annotations} line {number}: image not found: {image}")
        paths.append(str(image))
        labels.append(class_index[fields[1]])
    if not paths:
        raise DataError(f"{annotations} lists no images")
    test = FileSource(
        paths, np.asarray(labels, dtype=np.int64), tuple(class_index), str(annotations)
    )
    return {"train": train, "test": test}


# Checks before writing -----------------------------------------------------


def _file_sources(source: Source) -> list[FileSource]:
    if isinstance(source, FileSource):
        return [source]
    if isinstance(source, ConcatSource):
        return [part for part in source.parts if isinstance(part, FileSource)]
    return []


def _array_sources(source: Source) -> list[ArraySource]:
    if isinstance(source, ArraySource):
        return [source]
    if isinstance(source, ConcatSource):
        return [part for part in source.parts if isinstance(part, ArraySource)]
    return []


def _verify_image(path: str) -> str | None:
    """Decode one image fully; return what is wrong with it, or None."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.convert("RGB").load()
    except Exception as exc:  # noqa: BLE001 - every decoding failure is reported by file
        return f"{path}: {type(exc).__name__}: {exc}"
    if max(width, height) > _MAX_SIDE:
        return f"{path}: {width}x{height} exceeds FFCV's maximum side of {_MAX_SIDE}"
    return None


# Signal handlers that a forked child replaced. An inherited handler can
# reference objects whose finalizers send requests through sockets shared
# with the parent. Ray Train 2.60 leaves a SIGINT handler that references
# actor handles, and freeing it in a child broke the parent's connection to
# Ray. So the child keeps the handlers alive until it exits, and
# multiprocessing ends a forked child with os._exit, which frees nothing.
_REPLACED_HANDLERS: list = []


def set_signal_handler_in_child(signum: int, handler) -> None:
    """Set a signal handler in a forked child without freeing the inherited one."""
    _REPLACED_HANDLERS.append(signal.signal(signum, handler))


def _ignore_interrupts() -> None:
    # Pool workers leave Ctrl+C to the parent, which stops them with SIGTERM
    # when it leaves the pool. The default SIGTERM action replaces any handler
    # inherited from the parent, so they end without a traceback.
    set_signal_handler_in_child(signal.SIGINT, signal.SIG_IGN)
    set_signal_handler_in_child(signal.SIGTERM, signal.SIG_DFL)


def check_source(source: Source, workers: int = 1, description: str = "") -> None:
    """Check every sample of `source` so that the FFCV writer never meets a bad one.

    Arrays are checked for shape and type. Every image file is decoded once
    in `workers` processes, which costs about one decode per image on top of
    the conversion itself.

    Raises:
        DataError: naming up to five bad files and the number of bad files.
    """
    for array in _array_sources(source):
        images = array.images
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{array.origin}: images must be (N, H, W, 3) uint8, "
                f"got {images.shape} {images.dtype}"
            )
        if array.labels.shape != (len(images),):
            raise DataError(f"{array.origin}: {len(images)} images but {array.labels.size} labels")
    paths = [path for part in _file_sources(source) for path in part.paths]
    if not paths:
        return
    problems: list[str] = []
    chunk = max(1, min(64, len(paths) // (4 * workers)))
    progress = tqdm(total=len(paths), desc=f"checking {description}".strip(), unit="img")
    if workers > 1:
        with get_context("fork").Pool(workers, initializer=_ignore_interrupts) as pool:
            for problem in pool.imap(_verify_image, paths, chunksize=chunk):
                progress.update()
                if problem:
                    problems.append(problem)
    else:
        for path in paths:
            problem = _verify_image(path)
            progress.update()
            if problem:
                problems.append(problem)
    progress.close()
    if problems:
        listed = "\n  ".join(problems[:5])
        raise DataError(
            f"{len(problems)} of {len(paths)} images cannot be read; "
            f"fix or remove them:\n  {listed}"
        )
