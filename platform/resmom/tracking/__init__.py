"""MLflow adapter: the only package that talks to MLflow.

The driver opens the run (params, tags) and closes it; rank 0 of the workers
logs metrics into it by run id through `sender.MetricsLogger`. Everything goes
through `MlflowClient` with an explicit tracking URI, so no active-run state
leaks between runs. Retry settings are process-wide environment variables
(see `_single_attempt` and the worker entry point).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from resmom.paths import local_artifact_root, local_tracking_uri
from resmom.specs import JobSpec
from resmom.tracking.sender import MetricsLogger as MetricsLogger
from resmom.tracking.sender import TrackingError as TrackingError
from resmom.tracking.sender import failure_reason

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# MLflow's UI nests a run under the run whose id this tag holds.
PARENT_TAG = "mlflow.parentRunId"


def resolve_tracking_uri(spec_uri: str | None, data_dir: Path) -> str:
    """Return the spec's URI, else $MLFLOW_TRACKING_URI, else the local SQLite store."""
    uri = spec_uri or os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    (data_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    return local_tracking_uri(data_dir)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server named by the URI did not respond."""


# Seconds that the reachability check at start waits for the server.
CHECK_TIMEOUT_S = 5


@contextlib.contextmanager
def _single_attempt(timeout_s: int):
    """Make MLflow's HTTP calls in this process try once with a short timeout.

    MLflow reads these variables at each request; by default it retries 7
    times with exponential backoff, which turns a wrong URI into minutes of waiting.
    """
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_server(tracking_uri: str, timeout_s: int = CHECK_TIMEOUT_S) -> None:
    """Raise `TrackingUnavailable` within about `timeout_s` if an HTTP tracking server is down.

    Local stores (SQLite, files) need no server and pass.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    with _single_attempt(timeout_s):
        try:
            _client(tracking_uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - requests and MLflow raise many types here
            raise TrackingUnavailable(
                f"MLflow tracking server {tracking_uri} is not reachable ({failure_reason(exc)}); "
                "start it, or point run.tracking_uri or MLFLOW_TRACKING_URI at a running server"
            ) from None


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _git_commit() -> str:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip()


def ensure_experiment(tracking_uri: str, name: str, data_dir: Path) -> str:
    """Return the id of experiment `name`, creating it (artifacts in the data folder if local)."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):
        root = local_artifact_root(data_dir)
        root.mkdir(parents=True, exist_ok=True)
        artifact_location = root.as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def open_run(
    spec: JobSpec,
    tracking_uri: str,
    data_dir: Path,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Create the MLflow run of a job with the resolved spec as params; return its id.

    Args:
        parent_run_id: nest the run under this one (a sweep's parent run).
    """
    from mlflow.entities import Param, RunTag

    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, spec.run.experiment, data_dir)
    tags = {
        "mlflow.runName": spec.name,
        "method": spec.method.name,
        "variant": spec.variant,
        "dataset": spec.data.dataset,
        "seed": str(spec.seed),
        "git_commit": _git_commit(),
        **(extra_tags or {}),
    }
    if parent_run_id is not None:
        tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, tags=tags)
    params = [Param(k, v) for k, v in _flatten(spec.model_dump(mode="json")).items()]
    client.log_batch(run.info.run_id, params=params, tags=[RunTag("spec_schema", "job/1")])
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> str:
    """Mark an existing run as running again (for resume); return its id."""
    client = _client(tracking_uri)
    client.get_run(run_id)  # raises if the run does not exist
    client.update_run(run_id, status="RUNNING")
    return run_id


def end_run(
    tracking_uri: str, run_id: str, status: str, tags: dict[str, str] | None = None
) -> None:
    """Close a run with an MLflow status (FINISHED, FAILED, KILLED) and optional tags."""
    client = _client(tracking_uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)


def mark_failed(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Close a run as FAILED, logging a tracking error instead of raising it.

    Callers do this while another error propagates (a failed or diverged
    training), and that error, not an unreachable server, is the one to report.
    """
    try:
        end_run(tracking_uri, run_id, "FAILED", tags)
    except Exception as exc:  # noqa: BLE001 - requests and MLflow raise many types here
        log.warning(
            "could not mark MLflow run %s as FAILED in %s: %s",
            run_id, tracking_uri, failure_reason(exc),
        )  # fmt: skip


def delete_run(tracking_uri: str, run_id: str) -> None:
    """Move a run to MLflow's trash; searches no longer return it."""
    _client(tracking_uri).delete_run(run_id)


def get_run(tracking_uri: str, run_id: str):
    return _client(tracking_uri).get_run(run_id)


def open_sweep_run(
    name: str, experiment: str, tracking_uri: str, data_dir: Path, tags: dict[str, str]
) -> str:
    """Create the parent run of a sweep; its trials nest under it."""
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment, data_dir)
    all_tags = {"mlflow.runName": name, "role": "sweep", "sweep": name, **tags}
    all_tags["git_commit"] = _git_commit()
    return client.create_run(experiment_id, tags=all_tags).info.run_id


def child_runs(tracking_uri: str, parent_run: str) -> list:
    """Return every run nested under `parent_run`, oldest first."""
    client = _client(tracking_uri)
    experiment_id = client.get_run(parent_run).info.experiment_id
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run}'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, in step order."""
    history = _client(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def log_artifact_files(tracking_uri: str, run_id: str, files: list[Path], folder: str) -> None:
    client = _client(tracking_uri)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=folder)


def latest_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    return dict(_client(tracking_uri).get_run(run_id).data.metrics)
