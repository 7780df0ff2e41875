"""Training faults under Ray Train: a killed DDP worker, a diverging loss."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from resmom.cli import app
from resmom.paths import local_tracking_uri

DEMO_JOB = Path(__file__).resolve().parents[1] / "jobs" / "digits_byol_rm.yaml"
SMALL = [
    "model.width=8",
    "method.projector_hidden_dim=64",
    "method.predictor_hidden_dim=64",
    "method.projection_dim=32",
    "optim.batch_size=64",
    "run.cpus_per_worker=0.5",
    "run.checkpoint_every=1",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _run(data_dir: Path, experiment: str, *overrides: str):
    args = ["run", str(DEMO_JOB), "--data-dir", str(data_dir)]
    for assignment in [*SMALL, f"run.experiment={experiment}", *overrides]:
        args += ["--set", assignment]
    return CliRunner().invoke(app, args)


def _only_run(data_dir: Path, experiment: str):
    client = MlflowClient(tracking_uri=local_tracking_uri(data_dir))
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def _worker_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_killed_worker_restarts_from_checkpoint(data_dir: Path, ray_session, clean_env):
    """SIGKILL one DDP worker after the first checkpoint; the run ends with every epoch once."""
    started = time.time()
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            fresh = [
                path
                for path in (data_dir / "checkpoints").glob("*/last.pt")
                if path.stat().st_mtime > started
            ]
            pids = _worker_pids()
            if fresh and pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = _run(data_dir, "faults-kill", "optim.epochs=3", "run.max_failures=1")
    killer.join(timeout=1)

    assert killed, "no worker was killed"
    assert result.exit_code == 0, result.output
    client, run = _only_run(data_dir, "faults-kill")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert sorted(steps) == [1, 2, 3]


def test_diverging_run_is_tagged_and_exits_1(data_dir: Path, ray_session, clean_env):
    result = _run(data_dir, "faults-nan", "optim.epochs=2", "optim.lr=1.0e30")
    assert result.exit_code == 1
    assert "training diverged in epoch 1" in result.output
    _, run = _only_run(data_dir, "faults-nan")
    assert run.info.status == "FAILED"
    assert run.data.tags["diverged"] == "true"
    assert "Lower optim.lr" in run.data.tags["error"]
