"""`rmctl run` end to end: Ray Train with 2 gloo DDP workers, FFCV, MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from resmom.cli import app
from resmom.paths import local_tracking_uri

DEMO_JOB = Path(__file__).resolve().parents[1] / "jobs" / "digits_byol_rm.yaml"

EPOCH_METRICS = {
    "loss/ssl",
    "loss/rm",
    "loss/total",
    "gap/intra_cos",
    "gap/inter_cos",
    "gap/intra_cos_backbone",
    "probe/knn_top1_student",
    "probe/knn_top1_teacher",
    "probe/knn_gap",
    "sched/lr",
    "sched/momentum",
    "sched/alpha",
    "perf/img_per_s",
    "perf/data_wait_frac",
}


@pytest.fixture(scope="module")
def demo_run(data_dir: Path, ray_session, monkeypatch_module) -> tuple[str, str]:
    """Run the demo job for one epoch through the CLI; return (output, tracking URI)."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(DEMO_JOB),
            "--data-dir",
            str(data_dir),
            "--set",
            "optim.epochs=1",
            "--set",
            "run.cpus_per_worker=0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    return result.output, local_tracking_uri(data_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _only_run(tracking_uri: str):
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("resmom")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_run_logs_every_metric(demo_run):
    client, run = _only_run(demo_run[1])
    assert run.info.status == "FINISHED"
    assert EPOCH_METRICS <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "gap/intra_cos")
    assert [m.step for m in history] == [1]


def test_run_records_spec_and_tags(demo_run):
    _, run = _only_run(demo_run[1])
    tags = run.data.tags
    assert tags["method"] == "byol"
    assert tags["variant"] == "rm"
    assert tags["dataset"] == "digits"
    assert tags["seed"] == "0"
    params = run.data.params
    assert params["rm.alpha"] == "1.0"
    assert params["optim.epochs"] == "1"
    assert params["run.workers"] == "2"


def test_checkpoint_logged_as_artifact(demo_run, data_dir: Path):
    client, run = _only_run(demo_run[1])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/last.pt"]
    assert (data_dir / "checkpoints" / run.info.run_id / "last.pt").is_file()


def test_summary_table_printed(demo_run):
    output, tracking_uri = demo_run
    _, run = _only_run(tracking_uri)
    assert "kNN top-1, student" in output
    assert "intra gap" in output
    assert run.info.run_id in output
    assert "rmctl ui" in output


def test_reduced_metrics_plausible(demo_run):
    _, run = _only_run(demo_run[1])
    metrics = run.data.metrics
    assert 0.1 < metrics["probe/knn_top1_student"] <= 1.0
    assert 0 < metrics["gap/intra_cos"] < 2
    assert metrics["perf/img_per_s"] > 0


def test_probe_logs_linear_accuracy(demo_run, data_dir: Path):
    client, run = _only_run(demo_run[1])
    result = CliRunner().invoke(app, ["probe", run.info.run_id, "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    metrics = client.get_run(run.info.run_id).data.metrics
    for name in ("student", "teacher"):
        # Ten classes: chance is 0.1; frozen features of a trained encoder do far better.
        assert 0.5 < metrics[f"probe/linear_top1_{name}"] <= 1.0
    assert "linear probe" in result.output


def test_probe_unknown_run_fails_cleanly(data_dir: Path):
    result = CliRunner().invoke(app, ["probe", "0123456789abcdef", "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    assert "has no checkpoint" in result.output
