"""A remote MLflow tracking server and a Ray cluster, both started here on 127.0.0.1.

`mlflow server` and `ray start --head` run as separate processes, as on a
cluster; `rmctl` runs as its own process and reaches them by address only.
The server is stopped during a run to check that training goes on and that
every metric arrives once the server is back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from polling import wait_for

from resmom import tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DIGITS_JOB = ROOT / "jobs" / "digits_byol_rm.yaml"
DIGITS_SWEEP = ROOT / "sweeps" / "digits_alpha.yaml"
# Shrinks the shipped digits job to a few seconds per epoch.
TINY = [
    "model.width=8",
    "method.projector_hidden_dim=64",
    "method.predictor_hidden_dim=64",
    "method.projection_dim=32",
    "optim.batch_size=64",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the whole process group, since both servers start child processes."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store; can be stopped and started again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(BIN / "mlflow"), "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        log_file = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(self.is_up, 120, f"mlflow server on {self.uri}")

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            _stop_group(self.process, sig)
            self.process = None


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "mlflow-server")
    server.folder.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ray_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token authentication with a token of this test's own, for the head and every driver."""
    token_file = tmp_path / "ray-token"
    token_file.write_text(secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)


@pytest.fixture
def ray_head(tmp_path: Path, ray_auth) -> Iterator[str]:
    """A one-node Ray cluster from `ray start --head --block`; yields its address."""
    port = _free_port()
    # A short folder: Ray's socket paths must stay under the 107-byte limit of AF_UNIX.
    temp_dir = Path(f"/tmp/rmray{port}")
    command = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(port),
        "--num-cpus", "2",
        "--include-dashboard", "false",
        "--disable-usage-stats",
        "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    log_file = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"127.0.0.1:{port}"

    def accepts_connections() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(accepts_connections, 120, f"ray head on {address}")
    yield address
    _stop_group(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _rmctl(*args: str, without: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start `rmctl` in its own process, without the variables named in `without`."""
    # Wide lines, so that Rich does not wrap the messages that the tests look for.
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", *without):
        environment.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "resmom.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=environment,
    )


def _artifacts(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    return [entry.path for entry in client.list_artifacts(run_id, folder)]


def _sets(*assignments: str) -> list[str]:
    return [part for assignment in assignments for part in ("--set", assignment)]


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_unreachable_server_fails_fast(tmp_path: Path, command: str):
    uri = f"http://127.0.0.1:{_free_port()}"
    spec = DIGITS_JOB if command == "run" else DIGITS_SWEEP
    setting = "run.tracking_uri" if command == "run" else "tracking_uri"
    started = time.monotonic()
    driver = _rmctl(command, str(spec), "--data-dir", str(tmp_path), *_sets(f"{setting}={uri}"))
    output, _ = driver.communicate(timeout=120)
    elapsed = time.monotonic() - started

    assert driver.returncode == 1, output
    assert f"MLflow tracking server {uri} is not reachable" in output
    # Python and the package's imports take a few seconds of this on a busy machine.
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert not (tmp_path / "datasets").exists(), "data was prepared before the check"


def test_sweep_on_ray_cluster_and_mlflow_server(
    tmp_path: Path, mlflow_server: MlflowServer, ray_head: str
):
    """A 2-trial CPU sweep submitted to `ray start --head`, logging to `mlflow server`."""
    trial_sets = [f"base.{assignment}" for assignment in TINY]
    args = [
        "sweep", str(DIGITS_SWEEP),
        "--address", ray_head,
        "--data-dir", str(tmp_path / "data"),
        *_sets(
            "name=cluster_alpha",
            f"tracking_uri={mlflow_server.uri}",
            "fixed.optim.epochs=1",
            "seeds=[0]",
            "space.rm.alpha={grid: [0.0, 1.0]}",
            *trial_sets,
        ),
    ]  # fmt: skip
    # Without the cluster's token, the driver is turned away with a hint, and no trial starts.
    rejected = _rmctl(*args, without=("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"))
    output, _ = rejected.communicate(timeout=300)
    assert rejected.returncode == 1, output[-4000:]
    assert f"cannot join the Ray cluster at {ray_head}" in output
    assert "RAY_AUTH_MODE=token" in output
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("resmom-sweeps")
    (failed_parent,) = client.search_runs([experiment.experiment_id])
    assert failed_parent.info.status == "FAILED"

    # With the token, the same sweep continues in the same parent run.
    driver = _rmctl(*args)
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-4000:]

    (parent,) = client.search_runs([experiment.experiment_id], "tags.role = 'sweep'")
    assert parent.info.run_id == failed_parent.info.run_id
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(run.data.tags["trial"] for run in children) == ["t000", "t001"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert "probe/knn_top1_student" in run.data.metrics
        assert "gap/intra_cos" in run.data.metrics
        assert _artifacts(client, run.info.run_id, "checkpoints") == ["checkpoints/last.pt"]
    assert "report/report.csv" in _artifacts(client, parent.info.run_id, "report")


def _read_until(driver: subprocess.Popen, marker: str, lines: list[str], timeout_s: float) -> None:
    """Read the driver's output into `lines` until a line contains `marker`."""
    deadline = time.monotonic() + timeout_s
    for line in driver.stdout:
        lines.append(line)
        if marker in line:
            return
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line with {marker!r} in time:\n{''.join(lines[-40:])}")


def test_server_outage_keeps_training_and_metrics(tmp_path: Path, mlflow_server: MlflowServer):
    """Stop the server after epoch 1, start it after the last epoch: every epoch arrives once."""
    epochs = 4
    driver = _rmctl(
        "run", str(DIGITS_JOB),
        "--data-dir", str(tmp_path / "data"),
        *_sets(
            f"run.tracking_uri={mlflow_server.uri}",
            f"optim.epochs={epochs}",
            "run.checkpoint_every=1",
            *TINY,
        ),
    )  # fmt: skip
    lines: list[str] = []
    try:
        _read_until(driver, f"epoch 1/{epochs}", lines, 600)
        # A crash, not a shutdown: after SIGTERM, uvicorn still serves open
        # keep-alive connections for a while, and the next epochs' metrics
        # could arrive before the server is gone.
        mlflow_server.stop(signal.SIGKILL)
        # Training goes on without the server: the remaining epochs finish.
        _read_until(driver, f"epoch {epochs}/{epochs}", lines, 600)
        assert driver.poll() is None, "the run ended while the server was down"
        mlflow_server.start()
        rest, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            _stop_group(driver, signal.SIGKILL)
    output = "".join(lines) + rest
    assert driver.returncode == 0, output[-4000:]
    assert "unreachable, training goes on" in output

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resmom").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "loss/total")]
    assert sorted(steps) == list(range(1, epochs + 1))
    knn_steps = [
        metric.step
        for metric in client.get_metric_history(run.info.run_id, "probe/knn_top1_student")
    ]
    assert sorted(knn_steps) == list(range(1, epochs + 1))
    assert _artifacts(client, run.info.run_id, "checkpoints") == ["checkpoints/last.pt"]


def test_unsent_metrics_spool_and_resend(tmp_path: Path, mlflow_server: MlflowServer):
    """Metrics still queued at the flush timeout go to the spool file; a new logger sends them."""
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("spool")).info.run_id
    spool = tmp_path / "unsent.jsonl"
    mlflow_server.stop()

    logger = tracking.MetricsLogger(mlflow_server.uri, run_id, spool)
    for step in (1, 2, 3):
        logger.log({"loss/total": 1.0 / step}, step=step)
    with pytest.raises(tracking.TrackingError, match="not sent") as raised:
        logger.close(timeout_s=3)
    assert str(spool) in str(raised.value)
    assert len(spool.read_text().splitlines()) == 3

    mlflow_server.start()
    resent = tracking.MetricsLogger(mlflow_server.uri, run_id, spool)
    assert resent.last_step("loss/total") == 3
    resent.close(timeout_s=60)
    assert not spool.exists()
    history = client.get_metric_history(run_id, "loss/total")
    assert sorted(metric.step for metric in history) == [1, 2, 3]
    assert sorted(metric.value for metric in history) == [1 / 3, 1 / 2, 1.0]


def test_rejected_metric_raises_at_close(mlflow_server: MlflowServer):
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("rejected")).info.run_id
    logger = tracking.MetricsLogger(mlflow_server.uri, run_id)
    logger.log({"loss/total": 0.5}, step=1)
    # MLflow accepts metric keys of at most 250 characters.
    logger.log({"x" * 300: 1.0}, step=1)
    logger.log({"loss/total": 0.25}, step=2)
    with pytest.raises(tracking.TrackingError, match="rejected 1 requests"):
        logger.close(timeout_s=60)
    steps = [metric.step for metric in client.get_metric_history(run_id, "loss/total")]
    assert sorted(steps) == [1, 2]
