"""`rmctl sweep` end to end: Ray Tune trials, each a Ray Train job of 2 gloo workers, FFCV, MLflow.

One sweep of 4 one-epoch trials covers the parent and child runs, failing
trials, the report and a rerun. A second sweep has its driver killed and is
then resumed.
"""

from __future__ import annotations

import csv
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from polling import wait_for
from typer.testing import CliRunner

from resmom.cli import app
from resmom.paths import local_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SWEEP = ROOT / "sweeps" / "digits_alpha.yaml"
# Shrink the shipped digits sweep to seconds per trial.
TINY = [
    "base.model.width=8",
    "base.method.projector_hidden_dim=64",
    "base.method.predictor_hidden_dim=64",
    "base.method.projection_dim=32",
    "base.optim.batch_size=64",
]


@pytest.fixture(scope="module")
def clean_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)
        yield patch


def _children(client: MlflowClient, parent_id: str):
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return {run.data.tags["trial"]: run for run in runs}


def _parent(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("resmom-sweeps")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.role = 'sweep' and tags.sweep = '{name}'"
    )
    return parent


def _sweep_args(data_dir: Path, *assignments: str) -> list[str]:
    """Build `rmctl sweep` arguments for the shipped digits sweep, shrunk by TINY."""
    args = ["sweep", str(DIGITS_SWEEP), "--data-dir", str(data_dir)]
    for assignment in [*assignments, *TINY]:
        args += ["--set", assignment]
    return args


@pytest.fixture(scope="module")
def finished_sweep(data_dir: Path, ray_session, clean_env):
    """Alpha {0, 1} x lr {0.1, 1e30}: two trials finish, two diverge."""
    args = _sweep_args(
        data_dir,
        "name=e2e_alpha",
        "fixed.optim.epochs=1",
        "seeds=[0]",
        "space.rm.alpha={grid: [0.0, 1.0]}",
        "space.optim.lr={grid: [0.1, 1.0e30]}",
    )
    result = CliRunner().invoke(app, args)
    client = MlflowClient(tracking_uri=local_tracking_uri(data_dir))
    return result, client, args


def test_sweep_reports_failed_trials_and_exits_1(finished_sweep):
    result, _, _ = finished_sweep
    assert result.exit_code == 1, result.output
    assert "trial t001 failed" in result.output
    assert "trial t003 failed" in result.output
    assert "training diverged in epoch 1" in result.output


def test_parent_and_child_runs(finished_sweep):
    _, client, _ = finished_sweep
    parent = _parent(client, "e2e_alpha")
    assert parent.info.status == "FINISHED"
    children = _children(client, parent.info.run_id)
    assert sorted(children) == ["t000", "t001", "t002", "t003"]
    statuses = {key: run.info.status for key, run in children.items()}
    assert statuses == {"t000": "FINISHED", "t001": "FAILED", "t002": "FINISHED", "t003": "FAILED"}
    assert "training diverged in epoch 1" in children["t001"].data.tags["error"]
    assert children["t001"].data.tags["diverged"] == "true"
    assert "diverged" not in children["t000"].data.tags
    assert children["t002"].data.params["rm.alpha"] == "1.0"
    assert children["t002"].data.tags["variant"] == "rm"
    assert children["t000"].data.tags["variant"] == "baseline"
    for key in ("t000", "t002"):
        metrics = children[key].data.metrics
        assert {"probe/knn_top1_student", "gap/intra_cos", "loss/total"} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    for name in ("report.md", "report.csv", "alpha_accuracy.png", "alpha_gap.png"):
        assert f"report/{name}" in artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/sweep_spec.json"
    }


def test_report_numbers_match_the_runs(finished_sweep, data_dir):
    _, client, _ = finished_sweep
    children = _children(client, _parent(client, "e2e_alpha").info.run_id)
    result = CliRunner().invoke(app, ["report", "e2e_alpha", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    with (data_dir / "sweeps" / "e2e_alpha" / "report" / "report.csv").open() as handle:
        rows = {float(row["alpha"]): row for row in csv.DictReader(handle)}
    assert sorted(rows) == [0.0, 1.0]
    key = "probe/knn_top1_student"
    for alpha, trial in ((0.0, "t000"), (1.0, "t002")):
        assert float(rows[alpha][f"{key}:mean"]) == pytest.approx(
            statistics.fmean([children[trial].data.metrics[key]])
        )
        assert rows[alpha]["seeds"] == "1"
    expected_delta = children["t002"].data.metrics[key] - children["t000"].data.metrics[key]
    assert float(rows[1.0][f"{key}:delta"]) == pytest.approx(expected_delta)
    gap_delta = (
        children["t002"].data.metrics["gap/intra_cos"]
        - children["t000"].data.metrics["gap/intra_cos"]
    )
    assert float(rows[1.0]["gap/intra_cos:delta"]) == pytest.approx(gap_delta)


def test_ls_lists_the_sweep_and_its_trials(finished_sweep, data_dir):
    runner = CliRunner()
    overview = runner.invoke(app, ["ls", "--data-dir", str(data_dir)], terminal_width=200)
    assert overview.exit_code == 0, overview.output
    assert "e2e_alpha" in overview.output
    assert "2 failed" in overview.output
    trials = runner.invoke(
        app, ["ls", "e2e_alpha", "--data-dir", str(data_dir)], terminal_width=200
    )
    assert trials.exit_code == 0, trials.output
    rows = [line.split("│")[1:3] for line in trials.output.splitlines() if line.startswith("│ t0")]
    statuses = {key.strip(): status.strip() for key, status in rows}
    assert statuses == {
        "t000": "FINISHED",
        "t001": "DIVERGED",
        "t002": "FINISHED",
        "t003": "DIVERGED",
    }


def test_rerun_with_the_same_spec_adds_no_runs(finished_sweep):
    _, client, args = finished_sweep
    parent_id = _parent(client, "e2e_alpha").info.run_id
    before = {key: run.info.run_id for key, run in _children(client, parent_id).items()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1, again.output
    after = {key: run.info.run_id for key, run in _children(client, parent_id).items()}
    assert after == before
    changed = CliRunner().invoke(app, [*args, "--set", "seeds=[5]"])
    assert changed.exit_code == 2
    assert "already exists" in changed.output
    assert "--resume e2e_alpha" in changed.output


def test_killed_sweep_resumes_without_duplicates(data_dir: Path, ray_session, clean_env):
    """Kill the driver while the second trial runs, resume, and find every epoch once."""
    import ray

    args = _sweep_args(
        data_dir,
        "name=e2e_resume",
        "fixed.optim.epochs=3",
        "fixed.run.checkpoint_every=1",
        "seeds=[0]",
        "space.rm.alpha={grid: [0.0, 1.0]}",
        "max_concurrent=1",
    )
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resmom.cli",
            *args,
            "--address",
            address,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    client = MlflowClient(tracking_uri=local_tracking_uri(data_dir))

    def second_trial_checkpointed() -> bool:
        try:
            children = _children(client, _parent(client, "e2e_resume").info.run_id)
        except Exception:  # noqa: BLE001 - the store or the parent may not exist yet
            return False
        second = children.get("t001")
        return (
            children.get("t000") is not None
            and children["t000"].info.status == "FINISHED"
            and second is not None
            and (data_dir / "checkpoints" / second.info.run_id / "last.pt").is_file()
        )

    try:
        wait_for(second_trial_checkpointed, 300, "the second trial's first checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    parent_id = _parent(client, "e2e_resume").info.run_id
    killed = _children(client, parent_id)
    assert killed["t001"].info.status == "RUNNING"
    first_history = client.get_metric_history(killed["t000"].info.run_id, "gap/intra_cos")

    resumed = CliRunner().invoke(
        app, ["sweep", "--resume", "e2e_resume", "--data-dir", str(data_dir)]
    )
    assert resumed.exit_code == 0, resumed.output
    children = _children(client, parent_id)
    assert sorted(children) == ["t000", "t001"]
    assert {key: run.info.run_id for key, run in children.items()} == {
        key: run.info.run_id for key, run in killed.items()
    }
    assert {run.info.status for run in children.values()} == {"FINISHED"}
    for key in ("t000", "t001"):
        history = client.get_metric_history(children[key].info.run_id, "gap/intra_cos")
        assert sorted(m.step for m in history) == [1, 2, 3], key
    # The finished trial was not trained again.
    again = client.get_metric_history(children["t000"].info.run_id, "gap/intra_cos")
    assert [(m.step, m.value) for m in again] == [(m.step, m.value) for m in first_history]

    twice = CliRunner().invoke(
        app, ["sweep", "--resume", "e2e_resume", "--data-dir", str(data_dir)]
    )
    assert twice.exit_code == 0, twice.output
    assert {k: r.info.run_id for k, r in _children(client, parent_id).items()} == {
        k: r.info.run_id for k, r in children.items()
    }


@pytest.mark.slow
def test_soak_twenty_trials_with_two_failures(data_dir: Path, ray_session, clean_env):
    """Run 20 one-epoch trials, 2 diverging: 18 finish, 2 fail, and a resume changes nothing."""
    learning_rates = [0.1] * 9 + [1.0e30] + [0.1] * 9 + [1.0e30]
    args = _sweep_args(
        data_dir,
        "name=e2e_soak",
        "fixed.optim.epochs=1",
        "seeds=[0]",
        "space.rm.alpha={grid: [1.0]}",
        f"space.optim.lr={{grid: {learning_rates}}}",
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output

    client = MlflowClient(tracking_uri=local_tracking_uri(data_dir))
    parent_id = _parent(client, "e2e_soak").info.run_id
    children = _children(client, parent_id)
    statuses = [run.info.status for run in children.values()]
    assert len(children) == 20
    assert statuses.count("FINISHED") == 18
    assert statuses.count("FAILED") == 2
    assert {key for key, run in children.items() if run.info.status == "FAILED"} == {"t009", "t019"}

    again = CliRunner().invoke(app, ["sweep", "--resume", "e2e_soak", "--data-dir", str(data_dir)])
    assert again.exit_code == 1, again.output
    after = _children(client, parent_id)
    assert {k: r.info.run_id for k, r in after.items()} == {
        k: r.info.run_id for k, r in children.items()
    }
    assert [r.info.status for r in after.values()] == statuses
