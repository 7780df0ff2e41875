from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from resmom.cli import app
from resmom.specs import JobSpec, SpecError, apply_override, load_job, validate_job

DEMO_JOB = Path(__file__).resolve().parents[1] / "jobs" / "digits_byol_rm.yaml"
runner = CliRunner()


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _demo_raw() -> dict:
    return yaml.safe_load(DEMO_JOB.read_text())


def test_demo_job_is_valid():
    spec = load_job(DEMO_JOB)
    assert spec.method.name == "byol"
    assert spec.variant == "rm"
    assert spec.batch_per_rank * spec.run.workers == spec.optim.batch_size


def test_alpha_zero_is_baseline():
    spec = load_job(DEMO_JOB, ["rm.alpha=0"])
    assert spec.variant == "baseline"


def test_override_parses_yaml_scalars():
    raw: dict = {}
    apply_override(raw, "optim.lr=0.5")
    apply_override(raw, "data.augment.crop_scale=[0.2, 1.0]")
    assert raw == {"optim": {"lr": 0.5}, "data": {"augment": {"crop_scale": [0.2, 1.0]}}}


def test_override_without_equals_rejected():
    with pytest.raises(SpecError, match="expected key=value"):
        apply_override({}, "optim.lr")


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ("rm.alpah=1", "rm.alpah", "accepted keys: alpha, alpha_schedule"),
        ("rm.alpha=-0.5", "rm.alpha", "greater than or equal to 0"),
        ("method.name=simclr", "method.name", "'byol'"),
        ("data.dataset=mnist", "data.dataset", "digits, cifar10"),
        ("model.backbone=vgg", "model.backbone", "'resnet18'"),
        ("optim.batch_size=127", "optim.batch_size", "divisible by run.workers"),
        ("data.augment.crop_scale=[0.9, 0.2]", "crop_scale", "0 < low <= high <= 1"),
    ],
)
def test_invalid_field_named(override: str, field: str, hint: str):
    with pytest.raises(SpecError) as info:
        load_job(DEMO_JOB, [override])
    message = str(info.value)
    assert field in message
    assert hint in message


def test_unknown_top_level_key_lists_sections():
    with pytest.raises(SpecError) as info:
        validate_job({"name": "x", "optimiser": {}})
    assert "optimiser: unknown key" in str(info.value)
    assert "optim" in str(info.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nrm:\n  alpha: [1, 2\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+"):
        load_job(path)


def _python_call(marker: Path) -> str:
    """A YAML value that an unsafe loader turns into a call that creates `marker`."""
    return f"!!python/object/apply:builtins.exec [\"open('{marker}', 'w').close()\"]"


def test_python_tag_in_spec_rejected(tmp_path: Path):
    marker = tmp_path / "marker"
    path = tmp_path / "job.yaml"
    path.write_text(f"name: {_python_call(marker)}\n")
    result = runner.invoke(app, ["validate", str(path)])
    output = result.output.replace("\n", "")
    assert result.exit_code == 2
    assert f"invalid YAML in {path} at line 1, column 7" in output
    assert "tag 'tag:yaml.org,2002:python/object/apply:builtins.exec' is not accepted" in output
    assert "plain values only" in output
    assert not marker.exists()


def test_python_tag_in_override_rejected(tmp_path: Path):
    marker = tmp_path / "marker"
    result = runner.invoke(
        app, ["validate", str(DEMO_JOB), "--set", f"name={_python_call(marker)}"]
    )
    output = result.output.replace("\n", "")
    assert result.exit_code == 2
    assert "invalid value in override" in output
    assert "python/object/apply:builtins.exec' is not accepted" in output
    assert not marker.exists()


def test_missing_file_named(tmp_path: Path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_job(tmp_path / "nope.yaml")


def test_spec_is_frozen():
    spec = JobSpec(name="x")
    with pytest.raises(ValidationError, match="frozen"):
        spec.rm.alpha = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "override",
    ["rm.alpha=-1", "method.name=simclr", "data.dataset=mnist", "rm.unknown_option=3"],
)
def test_cli_run_rejects_invalid_spec_with_exit_2(override: str, tmp_path: Path):
    result = runner.invoke(
        app, ["run", str(DEMO_JOB), "--set", override, "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    field = override.split("=")[0]
    assert field in result.output
    # Nothing started: no data, no MLflow store.
    assert list(tmp_path.iterdir()) == []


def test_cli_validate_accepts_demo():
    result = runner.invoke(app, ["validate", str(DEMO_JOB)])
    assert result.exit_code == 0
    assert "valid job spec" in result.output


def test_cli_validate_rejects_unknown_key(tmp_path: Path):
    raw = _demo_raw()
    raw["method"]["queue_len"] = 4096
    result = runner.invoke(app, ["validate", str(_write(tmp_path, raw))])
    assert result.exit_code == 2
    assert "method.queue_len" in result.output
    assert "accepted keys" in result.output


def test_cli_prepare_rejects_unknown_dataset(tmp_path: Path):
    result = runner.invoke(app, ["data", "prepare", "cifar1000", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "cifar1000" in result.output
    assert "digits" in result.output
