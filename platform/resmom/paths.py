"""Paths of the data folder and of the files inside it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "RESMOM_DATA_DIR"


def resolve_data_dir(explicit: Path | str | None = None) -> Path:
    """Return the absolute data folder: `explicit`, else $RESMOM_DATA_DIR, else ./data.

    Paths are made absolute here because Ray workers may run in another
    working directory than the driver.
    """
    chosen = explicit or os.environ.get(DATA_DIR_ENV) or "data"
    return Path(chosen).expanduser().resolve()


def local_tracking_uri(data_dir: Path) -> str:
    """Return the SQLite URI of the embedded MLflow store inside the data folder."""
    return f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}"


def local_artifact_root(data_dir: Path) -> Path:
    return data_dir / "mlflow" / "artifacts"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` through a temporary file and a rename, so readers never see half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON through a temporary file and a rename, so readers never see half."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))
