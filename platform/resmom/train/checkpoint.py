"""Self-describing training checkpoints, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from resmom.specs import JobSpec

CHECKPOINT_NAME = "last.pt"
# Spec sections that may change between a run and its resumption: where and
# how it runs, not what it computes.
_RESUMABLE_CHANGES = {"name", "run"}
# Remedies for the usual causes of a failed write, by errno.
_WRITE_REMEDIES = {
    errno.ENOSPC: "Free space on the disk that holds it",
    errno.EDQUOT: "Free space within the disk quota",
    errno.EFBIG: "Raise the file size limit (ulimit -f)",
}


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written. The previous one at the same path is kept."""


class _ErrorRecordingWriter:
    """A binary file wrapper that keeps the OSError of a failed write.

    torch.save turns a failed write into a RuntimeError without the errno
    (torch 2.14: "unexpected pos ..."), so the cause is read from here.
    """

    def __init__(self, handle) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _write_error(path: Path, cause: OSError) -> CheckpointWriteError:
    remedy = _WRITE_REMEDIES.get(cause.errno, "Fix the cause")
    # One line, because Ray reports the last line of a worker's error.
    return CheckpointWriteError(
        f"failed to write checkpoint {path}: {cause}. "
        f"The previous checkpoint there is unchanged. {remedy}, then continue the run "
        "with `rmctl run JOB --resume RUN_ID`"
    )


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` through a temporary file in the same folder and a rename.

    Readers see either the previous checkpoint or the new one, never a part.
    The file is synced before the rename, so that a crash of the machine
    cannot leave the name pointing at data that never reached the disk.

    Raises:
        CheckpointWriteError: the write failed (a full disk, a file size
            limit); the previous checkpoint at `path` is unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer: _ErrorRecordingWriter | None = None
    try:
        with temporary.open("wb") as handle:
            writer = _ErrorRecordingWriter(handle)
            torch.save(payload, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as exc:
        cause = writer.error if writer is not None and writer.error is not None else exc
        if not isinstance(cause, OSError):
            raise
        raise _write_error(path, cause) from exc
    finally:
        temporary.unlink(missing_ok=True)
    # The rename itself reaches the disk only with the folder's entry.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read(path: Path) -> dict[str, Any]:
    """Load a checkpoint's payload onto the CPU, accepting only tensors and plain values.

    Raises:
        FileNotFoundError: no checkpoint at `path`.
        ValueError: the file is not a readable torch checkpoint, or it contains
            other objects, which would run code while unpickling.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message explains how to load the file unsafely. Only the
        # rejected global matters here.
        detail = next(
            (line.strip() for line in str(exc).splitlines() if "WeightsUnpickler" in line),
            str(exc).splitlines()[0],
        )
        raise ValueError(
            f"checkpoint {path} contains objects other than tensors and plain values, and "
            f"unpickling them could run code, so it is not loaded ({detail}). Use a checkpoint "
            "that resmom wrote"
        ) from exc
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {path} is not a readable torch checkpoint "
            f"({str(exc).splitlines()[0]}). The file is truncated or corrupt"
        ) from exc


def load(path: Path, spec: JobSpec) -> dict[str, Any]:
    """Load a checkpoint and check that it was written by the same experiment.

    Raises:
        FileNotFoundError: no checkpoint at `path`.
        ValueError: the file is unreadable or unsafe (see `read`), or the
            checkpoint's spec differs from `spec` in a field that changes the
            training (anything outside `name` and `run`).
    """
    payload = read(path)
    saved = json.loads(payload["spec"])
    current = spec.model_dump(mode="json")
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in _RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    )
    if changed:
        raise ValueError(
            f"checkpoint {path} was written with a different spec in: {', '.join(changed)}; "
            "resume with the spec it was written with"
        )
    return payload
