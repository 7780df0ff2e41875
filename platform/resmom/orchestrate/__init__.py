"""Ray adapter: the only module that calls Ray (init, Train, reporting).

Ray's training API has changed across releases; keeping every call here
means an upgrade touches one file. Written against Ray 2.60 (Train V2).
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

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
        ray.init(address=address, log_to_driver=True)
        return
    # A local instance listens on loopback only. Workers import `resmom` from
    # the installed package; the driver's working directory is not shipped.
    ray.init(_node_ip_address="127.0.0.1", log_to_driver=True)


def _log_to_stdout() -> None:
    """Send this package's INFO records to stdout, which Ray forwards to the driver."""
    package_log = logging.getLogger("resmom")
    if not package_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        package_log.propagate = False


def _train_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: re-validate the spec, train, log from rank 0."""
    import ray.train
    import ray.train.torch

    from resmom.train.loop import fit

    _log_to_stdout()
    spec = JobSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    logger = None
    if context.get_world_rank() == 0:
        logger = tracking.MetricsLogger(config["tracking_uri"], config["run_id"])

    def on_epoch(epoch: int, metrics: dict[str, float], written: Path | None) -> None:
        if logger is not None:
            logger.log(metrics, step=epoch)
            if written is not None:
                logger.log_checkpoint(written)
        ray.train.report({"epoch": epoch, **metrics})

    fit(
        spec,
        Path(config["train_path"]),
        Path(config["test_path"]),
        ray.train.torch.get_device(),
        on_epoch=on_epoch,
        checkpoint_dir=Path(config["checkpoint_dir"]),
        resume=config["resume"],
    )


def checkpoint_dir(data_dir: Path, run_id: str) -> Path:
    return data_dir / "checkpoints" / run_id


def run_job(
    spec: JobSpec, data_dir: Path, address: str | None = None, resume_run_id: str | None = None
) -> JobResult:
    """Prepare data, open (or reopen) the MLflow run, train with DDP workers, close the run.

    Args:
        resume_run_id: continue this MLflow run from its last checkpoint.

    Raises:
        RuntimeError: training failed; the MLflow run is marked FAILED.
        FileNotFoundError: `resume_run_id` has no checkpoint.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    paths = prepare(spec.data.dataset, data_dir, options=spec_options(spec.data))
    tracking_uri = tracking.resolve_tracking_uri(spec.run.tracking_uri, data_dir)
    if resume_run_id is not None:
        saved = checkpoint_dir(data_dir, resume_run_id) / "last.pt"
        if not saved.is_file():
            raise FileNotFoundError(f"run {resume_run_id} has no checkpoint at {saved}")
        run_id = tracking.reopen_run(tracking_uri, resume_run_id)
    else:
        run_id = tracking.open_run(spec, tracking_uri, data_dir)
    log.info("MLflow run %s in %s", run_id, tracking_uri)

    failed = True
    try:
        init_ray(address)
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "spec": spec.model_dump(mode="json"),
                "train_path": str(paths["train"]),
                "test_path": str(paths["test"]),
                "tracking_uri": tracking_uri,
                "run_id": run_id,
                "checkpoint_dir": str(checkpoint_dir(data_dir, run_id)),
                "resume": resume_run_id is not None,
            },
            scaling_config=ScalingConfig(
                num_workers=spec.run.workers,
                use_gpu=spec.run.use_gpu,
                resources_per_worker={"CPU": spec.run.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=f"{spec.name}-{run_id[:8]}", storage_path=str(data_dir / "ray")
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}") from result.error
        failed = False
    finally:
        tracking.finish_run(tracking_uri, run_id, failed=failed)

    metrics = tracking.latest_metrics(tracking_uri, run_id)
    return JobResult(run_id, tracking_uri, metrics, time.perf_counter() - started)
