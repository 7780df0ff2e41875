"""Write datasets into FFCV `.beton` files atomically, each with a manifest beside it.

A `.beton` is trusted only when its manifest exists and agrees with the file
and with the conversion options that the caller expects. The writer renames
the finished file into place first and the manifest last. An interrupted
conversion therefore leaves either nothing or a `.beton` without a manifest,
which `check_beton` rejects and `prepare` rewrites.
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from resmom.data import sources
from resmom.data.registry import IMAGEFOLDER_PREFIX, dataset_folder, dataset_info
from resmom.data.sources import DataError, Source
from resmom.paths import write_json_atomic

if TYPE_CHECKING:
    from resmom.specs import DataSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
MANIFEST_SUFFIX = ".manifest.json"
# Bumped whenever the manifest's content or the file's fields change meaning;
# older files are rewritten. Format 2 added the options and the aspect field.
MANIFEST_FORMAT = 2
# FFCV stores image sides as uint16.
_MAX_SIDE = 65535
# Seconds that a stopped writer process gets to end FFCV's workers before the
# caller kills them.
_WRITER_STOP_SECONDS = 5.0
_WRITE_REMEDY = (
    "nothing was kept. If the disk is full or the file size limit (ulimit -f) is reached, "
    "free space or raise the limit, then prepare again"
)


@dataclass(frozen=True)
class ConversionOptions:
    """Storage options of a `.beton`; an existing file is reused only with the same options."""

    write_mode: Literal["raw", "jpg"] = "raw"
    max_resolution: int | None = None  # maximum stored side; None keeps the source size
    jpeg_quality: int = 90  # used by write_mode jpg only

    def __post_init__(self) -> None:
        if self.write_mode not in ("raw", "jpg"):
            raise DataError(f"invalid write mode {self.write_mode!r}; accepted: raw, jpg")
        if self.max_resolution is not None and not 8 <= self.max_resolution <= _MAX_SIDE:
            raise DataError(
                f"invalid maximum resolution {self.max_resolution}; expected 8..{_MAX_SIDE}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"invalid JPEG quality {self.jpeg_quality}; expected 1..100")


class OptionMismatchError(DataError):
    """A valid `.beton` that was written with other conversion options than requested."""


class StaleFileError(DataError):
    """A `.beton` that no longer matches its manifest, or has no valid manifest.

    `problem` states what is wrong without the remedy, for the warning that
    `prepare` logs when it converts the file again.
    """

    def __init__(self, problem: str, remedy: str) -> None:
        super().__init__(f"{problem}; {remedy}")
        self.problem = problem


def default_options(dataset: str) -> ConversionOptions:
    info = dataset_info(dataset)
    return ConversionOptions(info.write_mode, info.max_resolution)


def spec_options(data: DataSpec) -> ConversionOptions:
    """Return the conversion options that a job's data spec requests."""
    return ConversionOptions(data.write_mode, data.max_resolution, data.jpeg_quality)


def beton_path(data_dir: Path, dataset: str, split: str) -> Path:
    return data_dir / dataset_folder(dataset) / f"{split}.beton"


def manifest_path(beton: Path) -> Path:
    return beton.with_name(beton.name + MANIFEST_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _GuardedSource:
    """A source whose failures are logged to a file instead of killing a writer process.

    FFCV's writer waits forever for a worker process that died on a sample.
    This wrapper hands the writer a 1x1 placeholder instead and records the
    failure in `error_log`, and `write_beton` raises after the writer returns.
    Each sample gains its aspect ratio (width / height), so that training can
    crop images that were decoded into squares with the right proportions.
    """

    def __init__(self, source: Source, error_log: Path) -> None:
        self.source = source
        self.error_log = error_log

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, float]:
        try:
            image, label = self.source[index]
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
            if not (0 < min(image.shape[:2]) and max(image.shape[:2]) <= _MAX_SIDE):
                raise ValueError(f"image sides must be in 1..{_MAX_SIDE}, got {image.shape[:2]}")
            return image, label, image.shape[1] / image.shape[0]
        except Exception as exc:  # noqa: BLE001 - recorded here, raised by write_beton
            with self.error_log.open("a") as handle:
                handle.write(f"sample {index}: {type(exc).__name__}: {exc}\n")
            return np.zeros((1, 1, 3), dtype=np.uint8), 0, 1.0


def _stored_sizes(path: Path) -> dict[str, list[int]]:
    from ffcv.reader import Reader

    # Metadata columns are unnamed (f0, f1, ...) in field order; the image is the first field.
    metadata = Reader(str(path)).metadata["f0"]
    heights, widths = metadata["height"], metadata["width"]
    return {
        "min": [int(heights.min()), int(widths.min())],
        "max": [int(heights.max()), int(widths.max())],
    }


class _WriterStopped(BaseException):
    """SIGTERM inside the writer process, raised so that it ends FFCV's workers first."""


class _WorkerFailed(Exception):
    """An FFCV worker process that ended with an error, e.g. on a full disk."""

    def __init__(self, exit_code: int, error: str) -> None:
        super().__init__(exit_code, error)
        self.exit_code = exit_code
        self.error = error


def _raise_writer_stopped(signum: int, frame) -> None:
    raise _WriterStopped()


class _WorkerErrorRecorder:
    """A stand-in for the writer's sys.stderr that FFCV's forked workers inherit.

    Everything goes to the real stream. Text that a worker process writes,
    which is the traceback that multiprocessing prints when a worker raises,
    is also appended to `record`, so that the error can name the cause.
    """

    def __init__(self, stream, record: Path) -> None:
        self.stream = stream
        self.record = record
        self.owner = os.getpid()

    def write(self, text: str) -> int:
        if os.getpid() != self.owner:
            with self.record.open("a") as handle:
                handle.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _watch_workers(failures: list[int]) -> None:
    """Stop the writer's main thread when an FFCV worker process fails.

    FFCV's writer waits for a sample count that a dead worker never reports,
    so without this a worker that fails on a full disk hangs the conversion.
    """
    seen: set[multiprocessing.Process] = set()
    while not failures:
        time.sleep(0.2)
        seen.update(multiprocessing.active_children())
        for worker in seen:
            if worker.exitcode not in (None, 0):
                failures.append(worker.exitcode)
                _thread.interrupt_main(signal.SIGTERM)
                return


def _writer_main(
    temporary: str,
    dataset: _GuardedSource,
    options: ConversionOptions,
    workers: int,
    errors,
    worker_errors: Path,
) -> None:
    """Body of the writer process: write `dataset` into `temporary` with FFCV.

    On any failure or on SIGTERM it kills FFCV's worker processes, removes the
    shared memory that FFCV allocated, sends the exception through `errors`
    and exits with code 1.
    """
    # The caller handles Ctrl+C and stops this process with SIGTERM. FFCV's
    # workers inherit the ignored SIGINT.
    sources.set_signal_handler_in_child(signal.SIGINT, signal.SIG_IGN)
    sources.set_signal_handler_in_child(signal.SIGTERM, _raise_writer_stopped)
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    sys.stderr = _WorkerErrorRecorder(sys.stderr, worker_errors)
    failures: list[int] = []
    threading.Thread(target=_watch_workers, args=(failures,), daemon=True).start()
    writer = None
    try:
        writer = DatasetWriter(
            temporary,
            {
                "image": RGBImageField(
                    write_mode=options.write_mode,
                    max_resolution=options.max_resolution,
                    jpeg_quality=options.jpeg_quality,
                ),
                "label": IntField(),
                "aspect": FloatField(),
            },
            num_workers=workers,
        )
        writer.from_indexed_dataset(dataset)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller through `errors`
        sources.set_signal_handler_in_child(signal.SIGTERM, signal.SIG_IGN)
        for worker in multiprocessing.active_children():
            worker.kill()
        for worker in multiprocessing.active_children():
            worker.join()
        # FFCV unlinks its shared memory only after a complete write.
        memory = getattr(writer, "metadata_sm", None)
        if hasattr(memory, "unlink"):
            memory.unlink()
        if failures:
            lines = worker_errors.read_text().splitlines() if worker_errors.exists() else []
            last = next((line for line in reversed(lines) if line.strip()), "no error printed")
            errors.send(_WorkerFailed(failures[0], last.strip()))
        elif isinstance(exc, Exception):
            try:
                errors.send(exc)
            except Exception:  # noqa: BLE001 - an exception that cannot be pickled
                errors.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit skips multiprocessing's exit handlers, which would wait
        # forever for FFCV's queue threads to hand their items to the workers
        # that were just killed.
        os._exit(1)


def _stop_writer(process) -> None:
    """Stop the writer process and its FFCV workers, then reap it."""
    from multiprocessing.connection import wait

    import psutil  # a dependency of FFCV

    def descendants() -> list[psutil.Process]:
        try:
            return psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    started = descendants()
    process.terminate()
    wait([process.sentinel], _WRITER_STOP_SECONDS)
    # The writer kills its workers itself, so these are left only when it
    # could not, e.g. because it was stuck. psutil checks that each is still
    # the process that it listed, so a reused process id is never signalled.
    for worker in started + descendants():
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    process.kill()
    process.join()


def _run_writer(
    temporary: Path, dataset: _GuardedSource, options: ConversionOptions, workers: int
) -> None:
    """Run FFCV's DatasetWriter in a child process that can be stopped at any time.

    FFCV starts its worker processes, queues and shared memory inside
    `from_indexed_dataset` and cleans none of them up when interrupted: after
    Ctrl+C the process can wait forever for its queue threads, and after
    SIGTERM the workers keep running. The child process owns all of them, so
    any exception here, KeyboardInterrupt included, stops the child and its
    workers before it propagates.

    Raises:
        _WorkerFailed: an FFCV worker process ended with an error.
        Exception: the one that the writer raised.
    """
    from multiprocessing import resource_tracker

    # Imported here, so that the writer process starts without FFCV's import
    # time (seconds of numba compilation) and an import error names itself.
    import ffcv.writer  # noqa: F401

    # FFCV's shared memory is registered with the resource tracker. Started
    # here, the tracker is shared with the writer process and removes what a
    # killed writer leaves when this process ends.
    resource_tracker.ensure_running()
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    worker_errors = temporary.with_name(temporary.name + ".workers")
    process = context.Process(
        target=_writer_main,
        args=(str(temporary), dataset, options, workers, sender, worker_errors),
        name="ffcv-writer",
    )
    try:
        process.start()
        sender.close()
        process.join()
    except BaseException:
        if process.pid is not None:
            _stop_writer(process)
        raise
    finally:
        sender.close()
        worker_errors.unlink(missing_ok=True)
    with receiver:
        if process.exitcode == 0:
            return
        try:
            error = receiver.recv()
        except EOFError:
            error = DataError(f"the FFCV writer process exited with code {process.exitcode}")
    raise error


def write_beton(
    path: Path,
    source: Source,
    options: ConversionOptions,
    workers: int = 1,
    origin: str | None = None,
) -> dict[str, Any]:
    """Write an image classification split to `path` and its manifest beside it.

    The file is written under a temporary name in the same folder and renamed
    into place, then its manifest is written the same way. The caller checks
    the source first (`sources.check_source`). An exception here, Ctrl+C
    included, stops FFCV's worker processes and removes the temporary file.

    Returns:
        The manifest that was written beside the file.

    Raises:
        DataError: a sample failed, or writing failed (a full disk); no file
            is left behind.
    """
    if len(source) == 0:
        raise DataError(f"{source.origin} has no images")
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path(path).unlink(missing_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    os.close(descriptor)
    error_log = Path(temporary + ".errors")
    for part in sources._file_sources(source):
        part.draft_size = options.max_resolution
    try:
        try:
            _run_writer(Path(temporary), _GuardedSource(source, error_log), options, workers)
        except OSError as exc:
            raise DataError(f"failed to write {path}: {exc}; {_WRITE_REMEDY}") from exc
        except _WorkerFailed as exc:
            raise DataError(
                f"failed to write {path}: an FFCV worker process ended with exit code "
                f"{exc.exit_code} ({exc.error}); {_WRITE_REMEDY}"
            ) from None
        if error_log.exists():
            lines = error_log.read_text().splitlines()
            listed = "\n  ".join(lines[:5])
            raise DataError(f"{len(lines)} samples of {source.origin} failed:\n  {listed}")
        labels = np.asarray(source_labels(source))
        labeled = labels[labels != sources.UNLABELED]
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": origin or source.origin,
            "count": int(len(labels)),
            "classes": sorted(int(c) for c in np.unique(labeled)),
            "class_names": list(source.classes),
            "segments": {name: list(span) for name, span in source.segments.items()},
            "resolution": _stored_sizes(Path(temporary)),
            "options": asdict(options),
            "size_bytes": Path(temporary).stat().st_size,
            "sha256": _sha256(Path(temporary)),
            "versions": {name: version(name) for name in ("ffcv", "numpy", "pillow", "resmom")},
        }
        # mkstemp creates the file readable by its owner only; a shared data
        # folder needs the usual permissions.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    finally:
        error_log.unlink(missing_ok=True)
    write_json_atomic(manifest_path(path), manifest)
    return manifest


def source_labels(source: Source) -> np.ndarray:
    """Return the (N,) labels of any source without decoding images."""
    if isinstance(source, sources.ConcatSource):
        return np.concatenate([part.labels for part in source.parts])
    return source.labels


def _check_options(path: Path, manifest: dict[str, Any], expected: ConversionOptions) -> None:
    stored = manifest.get("options", {})
    for name, wanted in asdict(expected).items():
        if name == "jpeg_quality" and expected.write_mode == "raw":
            continue
        if stored.get(name) != wanted:
            raise OptionMismatchError(
                f"{path} was written with {name}={stored.get(name)} but {name}={wanted} "
                "is requested; convert again with `rmctl data prepare ... --force` and the "
                "requested options, or request the stored ones"
            )


def check_beton(
    path: Path, expected: ConversionOptions | None = None, verify_checksum: bool = False
) -> dict[str, Any]:
    """Return the manifest of `path` after checking that the file matches it.

    Always checks that both files exist, the manifest format and the file
    size. `expected` adds the conversion options; `verify_checksum` reads the
    whole file.

    Raises:
        OptionMismatchError: the file was written with other options than `expected`.
        StaleFileError: the manifest is missing, corrupt or older, or the file
            no longer matches it.
        DataError: the file is missing.
    """
    manifest_file = manifest_path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}; run `rmctl data prepare`")
    if not manifest_file.is_file():
        raise StaleFileError(
            f"{path} has no manifest ({manifest_file.name}), so its conversion did not finish",
            "run `rmctl data prepare` again",
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise StaleFileError(
            f"corrupt manifest {manifest_file}: {exc}", "run `rmctl data prepare`"
        ) from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StaleFileError(
            f"{manifest_file} has manifest format {manifest.get('format')}, this version "
            f"reads format {MANIFEST_FORMAT}",
            "run `rmctl data prepare --force` to rewrite it",
        )
    size = path.stat().st_size
    if size != manifest["size_bytes"]:
        raise StaleFileError(
            f"{path} has {size} bytes but its manifest records {manifest['size_bytes']}, so "
            "the file changed after conversion",
            "run `rmctl data prepare --force`",
        )
    if expected is not None:
        _check_options(path, manifest, expected)
    if verify_checksum and _sha256(path) != manifest.get("sha256"):
        raise StaleFileError(
            f"{path} does not match the checksum in its manifest, so the file changed after "
            "conversion",
            "run `rmctl data prepare --force`",
        )
    return manifest


def _needs_source(dataset: str) -> bool:
    return dataset != "digits" and not dataset.startswith(IMAGEFOLDER_PREFIX)


def prepare(
    dataset: str,
    data_dir: Path,
    force: bool = False,
    source: Path | None = None,
    options: ConversionOptions | None = None,
    workers: int = 1,
    download: bool = False,
    classes_file: Path | None = None,
    verify_checksum: bool = False,
) -> dict[str, Path]:
    """Convert `dataset` into one `.beton` per split unless valid files already exist.

    Valid files are reused when their manifest records the requested
    `options` (the dataset's defaults when None). A file that changed after
    its conversion is converted again, with a warning that names it. Every
    split is read and checked before the first file is written. When writing
    fails or is interrupted, the files of every split are removed, so that no
    split is left from a conversion that did not finish.

    Args:
        source: folder with the dataset in its standard layout; digits and
            `imagefolder:PATH` need none.
        workers: processes that check and convert images.
        download: fetch the files into `source` with torchvision first.
        classes_file: class-list file of ImageNet-100.
        verify_checksum: compare existing files with their manifest's SHA-256,
            which reads them whole; otherwise only their sizes are compared.
    Returns:
        The path of each split's `.beton`.
    Raises:
        OptionMismatchError: valid files exist with other options and `force` is off.
        DataError: the source is missing, incomplete or corrupt, or writing failed.
    """
    options = options or default_options(dataset)
    paths = {split: beton_path(data_dir, dataset, split) for split in SPLITS}
    if not force:
        try:
            for path in paths.values():
                check_beton(path, expected=options, verify_checksum=verify_checksum)
            return paths
        except OptionMismatchError:
            raise
        except DataError as exc:
            if _needs_source(dataset) and source is None:
                raise DataError(
                    f"{dataset} is not prepared in {data_dir} ({exc}); convert it from its "
                    f"files with `rmctl data prepare {dataset} --source PATH`"
                ) from exc
            if isinstance(exc, StaleFileError):
                log.warning("%s; converting %s again", exc.problem, dataset)

    from resmom.data import catalog

    if download:
        if source is None:
            raise DataError("--download needs --source, the folder to download into")
        catalog.download(dataset, source)
    split_sources = catalog.read_dataset(dataset, source, classes_file)
    for split, split_source in split_sources.items():
        sources.check_source(split_source, workers, f"{dataset} {split}")
    log.info("converting %s into %s", dataset, paths["train"].parent)
    try:
        for split, split_source in split_sources.items():
            manifest = write_beton(paths[split], split_source, options, workers)
            log.info("wrote %s (%d images)", paths[split], manifest["count"])
    except BaseException:
        for path in paths.values():
            manifest_path(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        raise
    return paths


def sample_indices(manifest: dict[str, Any], segment: str) -> np.ndarray | None:
    """Return the uint64 indices of a named part of a `.beton`, or None for the whole file.

    `segment` is a segment name from the manifest (STL-10's `train` and
    `unlabeled`), `+`-joined names, or `labeled`: every segment but `unlabeled`.
    """
    segments = manifest.get("segments") or {}
    if not segments:
        if segment in ("labeled", "train", "test"):
            return None
        raise DataError(f"{manifest['source']} has no segment {segment!r}; it is not split")
    if segment == "labeled":
        names = [name for name in segments if name != "unlabeled"]
    else:
        names = segment.split("+")
    unknown = [name for name in names if name not in segments]
    if unknown:
        raise DataError(
            f"{manifest['source']} has no segment {unknown[0]!r}; it has {', '.join(segments)}"
        )
    ranges = [np.arange(*segments[name], dtype=np.uint64) for name in names]
    return np.concatenate(ranges)
