"""Sweep specs, their expansion into trials, and the report's arithmetic (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from resmom.cli import app
from resmom.plan import expand, fingerprint
from resmom.report.sweep import Group, TrialRow, baseline_of, group, table_rows
from resmom.specs import SpecError, load_sweep

ROOT = Path(__file__).resolve().parents[1]
DEMO_JOB = ROOT / "jobs" / "digits_byol_rm.yaml"


def _write(tmp_path: Path, sweep: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _sweep(**fields) -> dict:
    return {"name": "s", "base": str(DEMO_JOB), **fields}


def test_grid_times_seeds_in_order(tmp_path):
    path = _write(
        tmp_path,
        _sweep(
            space={"rm.alpha": {"grid": [0.0, 1.0]}, "optim.lr": {"grid": [0.1, 0.2]}}, seeds=[3, 4]
        ),
    )
    trials = expand(load_sweep(path))
    assert [t.key for t in trials] == [f"t{i:03d}" for i in range(8)]
    assert [(t.spec.rm.alpha, t.spec.optim.lr, t.spec.seed) for t in trials[:3]] == [
        (0.0, 0.1, 3),
        (0.0, 0.1, 4),
        (0.0, 0.2, 3),
    ]
    assert {t.spec.variant for t in trials} == {"baseline", "rm"}
    assert [t.spec.name for t in trials[:2]] == ["s-t000", "s-t001"]
    assert all(t.spec.run.experiment == "resmom-sweeps" for t in trials)


def test_random_draws_are_reproducible_and_in_bounds(tmp_path):
    space = {
        "optim.lr": {"loguniform": [0.001, 0.1]},
        "rm.alpha": {"uniform": [0.5, 2.0]},
        "model.width": {"choice": [8, 16]},
    }
    path = _write(tmp_path, _sweep(space=space, num_samples=5, sample_seed=7))
    first = [t.overrides for t in expand(load_sweep(path))]
    second = [t.overrides for t in expand(load_sweep(path))]
    assert first == second
    assert len(first) == 5
    assert all(0.001 <= o["optim.lr"] <= 0.1 for o in first)
    assert all(0.5 <= o["rm.alpha"] <= 2.0 for o in first)
    assert {o["model.width"] for o in first} <= {8, 16}
    other = load_sweep(path, ["sample_seed=8"])
    assert [t.overrides for t in expand(other)] != first


def test_grid_only_ignores_num_samples(tmp_path):
    path = _write(tmp_path, _sweep(space={"rm.alpha": {"grid": [0.0, 1.0]}}, num_samples=3))
    assert len(expand(load_sweep(path))) == 2


def test_fixed_fields_resources_and_mapping_merge(tmp_path):
    sweep = _sweep(
        fixed={"optim.epochs": 3},
        space={"data": {"grid": [{"resolution": 24}, {"resolution": 32}]}},
        resources={"workers": 1, "cpus_per_worker": 2},
    )
    trials = expand(load_sweep(_write(tmp_path, sweep)))
    assert [t.spec.data.resolution for t in trials] == [24, 32]
    # The merge keeps the base job's other data fields.
    assert all(t.spec.data.augment.flip_p == 0.0 for t in trials)
    assert all(t.spec.optim.epochs == 3 for t in trials)
    assert all((t.spec.run.workers, t.spec.run.cpus_per_worker) == (1, 2) for t in trials)


def test_base_path_is_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "j.yaml").write_text(DEMO_JOB.read_text())
    (tmp_path / "sweeps").mkdir()
    path = _write(tmp_path / "sweeps", {"name": "s", "base": "../jobs/j.yaml"})
    assert expand(load_sweep(path))[0].spec.method.name == "byol"


def test_set_overrides_base_space_and_fixed(tmp_path):
    path = _write(tmp_path, _sweep(space={"rm.alpha": {"grid": [0.0, 1.0]}}))
    sweep = load_sweep(
        path,
        ["base.optim.epochs=2", "space.rm.alpha={grid: [0.5]}", "fixed.model.width=8", "seeds=[1]"],
    )
    (trial,) = expand(sweep)
    assert (trial.spec.optim.epochs, trial.spec.rm.alpha, trial.spec.model.width) == (2, 0.5, 8)
    assert trial.spec.seed == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"space": {"rm.alpha": {"grid": [0], "choice": [1]}}}, "exactly one of grid"),
        ({"space": {"rm.alpha": {}}}, "exactly one of grid"),
        ({"space": {"optim.lr": {"loguniform": [0, 1]}}}, "0 < low < high"),
        ({"space": {"optim.lr": {"uniform": [1, 0]}}}, "low < high"),
        ({"space": {"seed": {"grid": [1]}}}, "list seeds under `seeds`"),
        ({"fixed": {"run.experiment": "x"}}, "sets this field itself"),
        ({"fixed": {"run.workers": 4}, "resources": {"workers": 1}}, "sets this field itself"),
        ({"seeds": []}, "seeds"),
        ({"name": "a b"}, "name"),
        ({"schedule": "asha"}, "unknown key; accepted keys: base, experiment, fixed"),
        ({"scheduler": {"name": "hyperband"}}, "scheduler.name"),
    ],
)
def test_invalid_sweep_fields_are_named(tmp_path, fields, message):
    with pytest.raises(SpecError, match=None) as caught:
        load_sweep(_write(tmp_path, _sweep(**fields)))
    assert message in str(caught.value)


def test_invalid_trial_names_the_trial_and_the_field(tmp_path):
    path = _write(tmp_path, _sweep(space={"rm.alfa": {"grid": [1.0]}}))
    with pytest.raises(SpecError) as caught:
        expand(load_sweep(path))
    text = str(caught.value)
    assert "trial t000" in text
    assert "rm.alfa: unknown key" in text
    assert "alpha" in text


def test_trial_that_breaks_a_job_rule_is_refused(tmp_path):
    path = _write(tmp_path, _sweep(space={"optim.batch_size": {"grid": [128, 127]}}))
    with pytest.raises(SpecError, match="(?s)trial t001.*divisible by run.workers"):
        expand(load_sweep(path))


def test_missing_base_file(tmp_path):
    with pytest.raises(SpecError, match="base job file not found"):
        load_sweep(_write(tmp_path, {"name": "s", "base": "nope.yaml"}))


def test_fingerprint_follows_the_spec(tmp_path):
    path = _write(tmp_path, _sweep(space={"rm.alpha": {"grid": [0.0, 1.0]}}))
    assert fingerprint(load_sweep(path)) == fingerprint(load_sweep(path))
    assert fingerprint(load_sweep(path)) != fingerprint(load_sweep(path, ["seeds=[0, 1]"]))


@pytest.mark.parametrize("spec", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_expand(spec):
    trials = expand(load_sweep(spec))
    assert trials
    assert len({t.spec.name for t in trials}) == len(trials)


def test_paper_ablation_sweep_matches_its_description():
    trials = expand(load_sweep(ROOT / "sweeps" / "ablation_alpha.yaml"))
    assert {t.spec.method.name for t in trials} == {"mocov3"}
    assert {t.spec.data.dataset for t in trials} == {"cifar100"}
    assert {t.spec.model.backbone for t in trials} == {"resnet18"}
    assert 0.0 in {t.spec.rm.alpha for t in trials}
    assert len({t.spec.seed for t in trials}) == 3


def test_dry_run_prints_the_trials_and_starts_nothing(tmp_path):
    path = _write(tmp_path, _sweep(space={"rm.alpha": {"grid": [0.0, 1.0]}}))
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "t000" in result.output
    assert "t001" in result.output
    assert "baseline" in result.output
    assert "Dry run: 2 trials" in result.output
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "space.rm.alfa={grid: [1]}"], "rm.alfa: unknown key"),
        (["--set", "seeds=zero"], "seeds"),
    ],
)
def test_sweep_cli_rejects_bad_specs_with_code_2(tmp_path, args, message):
    path = _write(tmp_path, _sweep())
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_sweep_cli_argument_rules(tmp_path):
    path = _write(tmp_path, _sweep())
    runner = CliRunner()
    both = runner.invoke(app, ["sweep", str(path), "--resume", "s"])
    assert both.exit_code == 2
    assert "not both" in both.output
    unknown = runner.invoke(app, ["sweep", "--resume", "nope", "--data-dir", str(tmp_path)])
    assert unknown.exit_code == 2
    assert "no sweep named 'nope'" in unknown.output
    report = runner.invoke(app, ["report", "nope", "--data-dir", str(tmp_path)])
    assert report.exit_code == 2
    assert "no sweep named" in report.output


def _row(key, alpha, seed, knn, gap, status="FINISHED", setting=""):
    metrics = {"probe/knn_top1_student": knn, "gap/intra_cos": gap}
    return TrialRow(key, key, status, "digits", "byol", alpha, seed, setting, metrics)


def test_report_groups_means_stds_and_deltas():
    rows = [
        _row("t0", 0.0, 0, 0.70, 0.50),
        _row("t1", 0.0, 1, 0.80, 0.40),
        _row("t2", 1.0, 0, 0.85, 0.20),
        _row("t3", 1.0, 1, 0.95, 0.30),
        _row("t4", 1.0, 2, 0.10, 0.90, status="FAILED"),
    ]
    groups = group(rows)
    assert [(g.alpha, len(g.rows)) for g in groups] == [(0.0, 2), (1.0, 2)]
    baseline, rm = groups
    assert baseline_of(rm, groups) is baseline
    assert math.isclose(rm.mean("probe/knn_top1_student"), 0.90)
    # Sample standard deviation of (0.85, 0.95).
    assert math.isclose(rm.std("probe/knn_top1_student"), math.sqrt(0.005))
    cells = table_rows(groups)
    header_delta_knn = -3  # the first of the three delta columns
    assert cells[0][header_delta_knn] == "-"
    assert cells[1][header_delta_knn] == "+15.00"  # 90.00 - 75.00 percentage points
    assert cells[1][-1] == "-0.2000"  # 0.25 - 0.45
    assert cells[1][5] == "90.00 ± 7.07"


def test_report_compares_within_the_same_setting():
    rows = [
        _row("t0", 0.0, 0, 0.5, 0.5, setting="optim.lr=0.1"),
        _row("t1", 1.0, 0, 0.6, 0.4, setting="optim.lr=0.1"),
        _row("t2", 1.0, 0, 0.9, 0.4, setting="optim.lr=0.2"),
    ]
    groups = group(rows)
    lonely = next(g for g in groups if g.setting == "optim.lr=0.2")
    assert baseline_of(lonely, groups) is None
    assert isinstance(lonely, Group)


def test_asha_scheduler_follows_the_spec(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from resmom.orchestrate.sweep import _scheduler

    sweep = load_sweep(
        _write(
            tmp_path, _sweep(scheduler={"name": "asha", "metric": "gap/intra_cos", "mode": "min"})
        )
    )
    scheduler = _scheduler(sweep, epochs=8)
    assert isinstance(scheduler, ASHAScheduler)
    assert scheduler.metric == "gap/intra_cos"
    # Ray keeps the mode and the time attribute in private fields (Ray 2.60).
    assert scheduler._mode == "min"
    assert scheduler._time_attr == "epoch"
    assert scheduler._max_t == 8
    assert _scheduler(load_sweep(_write(tmp_path, _sweep())), epochs=8) is None


def test_validate_checks_sweeps_and_their_trials(tmp_path):
    path = _write(tmp_path, _sweep(space={"rm.alpha": {"grid": [0.0, 1.0]}}))
    runner = CliRunner()
    valid = runner.invoke(app, ["validate", str(path)])
    assert valid.exit_code == 0, valid.output
    assert "sweep spec s (2 trials)" in valid.output
    invalid = runner.invoke(app, ["validate", str(path), "--set", "space.rm.alpha={grid: [-1]}"])
    assert invalid.exit_code == 2
    assert "rm.alpha: Input should be greater than or equal to 0" in invalid.output


def test_error_messages_keep_square_brackets(tmp_path):
    path = _write(tmp_path, _sweep())
    result = CliRunner().invoke(
        app, ["sweep", str(path), "--dry-run", "--set", "space.optim.lr={loguniform: [0, 1]}"]
    )
    assert result.exit_code == 2
    assert "needs [low, high] with 0 < low < high" in result.output
