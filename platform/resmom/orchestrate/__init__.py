"""Ray adapter: the only package that calls Ray (init and Train here, Tune in `sweep`).

Ray's training API has changed across releases; keeping every call here
means an upgrade touches one file. Written against Ray 2.60 (Train V2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resmom import tracking
from resmom.data.beton import prepare, spec_options
from resmom.specs import JobSpec
from resmom.train.checkpoint import CHECKPOINT_NAME

log = logging.getLogger(__name__)

# A metric that the worker loop logs every epoch.
_EPOCH_KEY = "loss/total"
# Metrics that rank 0 could not send before its flush timeout, kept beside the checkpoint.
UNSENT_METRICS_NAME = "unsent_metrics.jsonl"
# Seconds one MLflow request of a worker may take before the logger retries it.
_REQUEST_TIMEOUT_S = 30

RAY_ADDRESS_ENV = "RAY_ADDRESS"


@dataclass(frozen=True)
class JobResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    wall_seconds: float


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:
            raise ConnectionError(
                f"cannot join the Ray cluster at {address} ({exc}). Check the address "
                "(`ray status` on the head prints it); if the cluster uses token "
                "authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH) to the cluster's token"
            ) from None
        return
    # Workers import `resmom` from the installed package; the driver's working
    # directory is not shipped. The dashboard listens on 127.0.0.1 only.
    # NOTE: Ray 2.60 registers the node under the host's routable address
    # even when asked for 127.0.0.1 (`services.resolve_ip_for_localhost`), so
    # its GCS and raylet are reachable from the network, guarded by Ray's token
    # authentication (on by default in 2.60). A loopback-only local mode would
    # need support in Ray, or a firewall rule on shared hosts.
    ray.init(dashboard_host="127.0.0.1", log_to_driver=True)


def _log_to_stdout() -> None:
    """Send this package's INFO records to stdout, which Ray forwards to the driver."""
    package_log = logging.getLogger("resmom")
    if not package_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        package_log.propagate = False


def _quiet_ray_reports() -> None:
    """Silence Ray Train's INFO line per `ray.train.report`, which repeats our epoch line."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a private module; other Ray releases may move it
        return
    # Ray names this logger after the module's file path, not its dotted name.
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: re-validate the spec, train, log from rank 0."""
    import ray.train
    import ray.train.torch

    from resmom.train.loop import fit

    _log_to_stdout()
    _quiet_ray_reports()
    spec = JobSpec.model_validate(config["spec"])
    folder = Path(config["checkpoint_dir"])
    # Ray Train restarts a failed worker group with the same config, so a
    # checkpoint that a fresh run finds can only come from the failed group.
    resume = config["resume"] or (folder / CHECKPOINT_NAME).is_file()
    context = ray.train.get_context()
    logger = None
    logged_epochs = 0
    if context.get_world_rank() == 0:
        spool = folder / UNSENT_METRICS_NAME
        logger = tracking.MetricsLogger(config["tracking_uri"], config["run_id"], spool)
        if resume:
            logged_epochs = logger.last_step(_EPOCH_KEY)
        # From here on, only the logger's thread calls MLflow, and it retries
        # by itself without holding up training, so each request tries once.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(_REQUEST_TIMEOUT_S)

    def on_epoch(epoch: int, metrics: dict[str, float], written: Path | None) -> None:
        # Epochs after the last checkpoint are trained again after a restart
        # and give the same metrics (resume is exact), so they are logged once.
        if logger is not None and epoch > logged_epochs:
            logger.log(metrics, step=epoch)
        if logger is not None and written is not None:
            logger.log_checkpoint(written)
        ray.train.report({"epoch": epoch, **metrics})

    try:
        fit(
            spec,
            Path(config["train_path"]),
            Path(config["test_path"]),
            ray.train.torch.get_device(),
            on_epoch=on_epoch,
            checkpoint_dir=folder,
            resume=resume,
        )
    except BaseException:
        # The epochs before the failure still belong in the run; the training
        # error, not a tracking one, is what the caller must see.
        if logger is not None:
            with contextlib.suppress(tracking.TrackingError):
                logger.close(spec.run.tracking_flush_timeout)
        raise
    if logger is not None:
        logger.close(spec.run.tracking_flush_timeout)


def checkpoint_dir(data_dir: Path, run_id: str) -> Path:
    return data_dir / "checkpoints" / run_id


def fit_job(
    spec: JobSpec,
    paths: dict[str, Path],
    tracking_uri: str,
    run_id: str,
    data_dir: Path,
    resume: bool,
    callbacks: list[Any] | None = None,
) -> None:
    """Train `spec` with its DDP workers under Ray Train, logging into MLflow run `run_id`.

    Raises:
        TrainingDiverged: a worker's loss became NaN or infinite.
        RuntimeError: a worker failed; the message carries the worker's error.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": spec.run.cpus_per_worker}
    if spec.run.use_gpu:
        resources["GPU"] = spec.run.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "train_path": str(paths["train"]),
            "test_path": str(paths["test"]),
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "checkpoint_dir": str(checkpoint_dir(data_dir, run_id)),
            "resume": resume,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.run.workers,
            use_gpu=spec.run.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=f"{spec.name}-{run_id[:8]}",
            storage_path=str(data_dir / "ray"),
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=spec.run.max_failures),
        ),
    )
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # Ray raises its own error types for worker failures.
        error = exc
    if error is not None:
        message = _root_message(error)
        if "DivergenceError" in message:
            raise TrainingDiverged(message.partition(": ")[2] or message) from error
        raise RuntimeError(f"training failed: {message}") from error


class TrainingDiverged(RuntimeError):
    """A worker stopped because the loss became NaN or infinite; its last checkpoint is kept."""


# Maximum error text kept in an MLflow tag (MLflow 3 caps tag values at 8000 characters).
_ERROR_CHARS = 4000


def failure_tags(error: BaseException) -> dict[str, str]:
    """MLflow tags that record why a run failed: `error`, and `diverged` for a NaN loss."""
    tags = {"error": str(error)[:_ERROR_CHARS]}
    if isinstance(error, TrainingDiverged):
        tags["diverged"] = "true"
    return tags


def _root_message(error: BaseException) -> str:
    """Return the worker's own exception line from a Ray error, without Ray's traceback."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Ray's worker-group errors end with the worker's "Type: message" line.
    return lines[-1] if lines else type(error).__name__


def has_checkpoint(data_dir: Path, run_id: str) -> bool:
    return (checkpoint_dir(data_dir, run_id) / CHECKPOINT_NAME).is_file()


def run_job(
    spec: JobSpec, data_dir: Path, address: str | None = None, resume_run_id: str | None = None
) -> JobResult:
    """Prepare data, open (or reopen) the MLflow run, train with DDP workers, close the run.

    Args:
        resume_run_id: continue this MLflow run from its last checkpoint.

    Raises:
        TrainingDiverged: the loss became NaN or infinite; the run is marked FAILED
            with the tag `diverged`.
        RuntimeError: training failed; the MLflow run is marked FAILED with the tag `error`.
        FileNotFoundError: `resume_run_id` has no checkpoint.
    """
    started = time.perf_counter()
    tracking_uri = tracking.resolve_tracking_uri(spec.run.tracking_uri, data_dir)
    tracking.check_server(tracking_uri)
    # Conversion forks FFCV's writer processes, so it runs before Ray starts
    # its threads in this process.
    paths = prepare(spec.data.dataset, data_dir, options=spec_options(spec.data))
    init_ray(address)
    if resume_run_id is not None:
        if not has_checkpoint(data_dir, resume_run_id):
            folder = checkpoint_dir(data_dir, resume_run_id)
            raise FileNotFoundError(f"run {resume_run_id} has no checkpoint in {folder}")
        run_id = tracking.reopen_run(tracking_uri, resume_run_id)
    else:
        run_id = tracking.open_run(spec, tracking_uri, data_dir)
    log.info("MLflow run %s in %s", run_id, tracking_uri)

    try:
        fit_job(spec, paths, tracking_uri, run_id, data_dir, resume=resume_run_id is not None)
    except BaseException as exc:
        tracking.mark_failed(tracking_uri, run_id, failure_tags(exc))
        raise
    tracking.end_run(tracking_uri, run_id, "FINISHED")

    metrics = tracking.latest_metrics(tracking_uri, run_id)
    return JobResult(run_id, tracking_uri, metrics, time.perf_counter() - started)
