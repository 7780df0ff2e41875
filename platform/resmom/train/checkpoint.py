"""Self-describing training checkpoints, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from resmom.specs import JobSpec

CHECKPOINT_NAME = "last.pt"
# Spec sections that may change between a run and its resumption: where and
# how it runs, not what it computes.
_RESUMABLE_CHANGES = {"name", "run"}


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` through a temporary file, so a failed write keeps the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load(path: Path, spec: JobSpec) -> dict[str, Any]:
    """Load a checkpoint and check that it was written by the same experiment.

    Raises:
        FileNotFoundError: no checkpoint at `path`.
        ValueError: the checkpoint's spec differs from `spec` in a field that
            changes the training (anything outside `name` and `run`).
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
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
