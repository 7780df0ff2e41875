"""Checkpoint, crash, resume: the resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resmom.specs import validate_job
from resmom.train import checkpoint
from resmom.train.loop import fit

CPU = torch.device("cpu")


def _spec(method: str = "mocov2"):
    # MoCo v2 exercises the most state: queue, constant momentum, optimizer momentum.
    extra = {"queue_size": 512} if method == "mocov2" else {"predictor_hidden_dim": 64}
    return validate_job(
        {
            "name": "resume",
            "model": {"width": 4},
            "method": {
                "name": method,
                "projector_hidden_dim": 64,
                "projection_dim": 16,
                **extra,
            },
            "optim": {"epochs": 2, "batch_size": 128, "lr": 0.05},
            "run": {"workers": 1, "checkpoint_every": 1},
        }
    )


class _Crash(RuntimeError):
    pass


def test_resume_equals_uninterrupted(digits_paths: dict[str, Path], tmp_path: Path):
    spec = _spec()
    straight: list[dict[str, float]] = []
    fit(spec, digits_paths["train"], digits_paths["test"], CPU, lambda _, m, __: straight.append(m))

    def crash_after_first_epoch(epoch: int, metrics, written) -> None:
        assert written is not None
        raise _Crash(epoch)

    with pytest.raises(_Crash):
        fit(
            spec, digits_paths["train"], digits_paths["test"], CPU,
            crash_after_first_epoch, checkpoint_dir=tmp_path,
        )  # fmt: skip
    resumed: list[dict[str, float]] = []
    fit(
        spec, digits_paths["train"], digits_paths["test"], CPU,
        lambda _, m, __: resumed.append(m), checkpoint_dir=tmp_path, resume=True,
    )  # fmt: skip

    assert len(resumed) == 1
    for key in (
        "loss/total",
        "loss/ssl",
        "loss/rm",
        "gap/intra_cos",
        "sched/lr",
        "probe/knn_top1_student",
    ):
        assert resumed[0][key] == pytest.approx(straight[1][key], rel=1e-6, abs=1e-9), key


def test_checkpoint_describes_itself(digits_paths: dict[str, Path], tmp_path: Path):
    spec = _spec("byol")
    fit(spec, digits_paths["train"], digits_paths["test"], CPU, checkpoint_dir=tmp_path)
    payload = torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, weights_only=True)
    assert payload["epoch"] == 2
    assert payload["step"] > 0
    assert json.loads(payload["spec"])["method"]["name"] == "byol"
    assert set(payload) >= {"student", "teacher", "optimizer", "queue", "torch_rng", "augment_rng"}


def test_resume_with_other_spec_rejected(digits_paths: dict[str, Path], tmp_path: Path):
    fit(_spec("byol"), digits_paths["train"], digits_paths["test"], CPU, checkpoint_dir=tmp_path)
    other = _spec("mocov3")
    with pytest.raises(ValueError, match="different spec in: method"):
        checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME, other)


# Saves once, then lowers the file size limit below the next, larger
# checkpoint, so that the kernel fails the second write with EFBIG the way a
# full disk fails it with ENOSPC.
_FULL_DISK_SCRIPT = """
import json, resource, signal, sys
from pathlib import Path

import torch

from resmom.train import checkpoint

# Python ignores SIGXFSZ already, so a write past the limit raises EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path(sys.argv[1])
checkpoint.save(path, {"epoch": 1, "weights": torch.arange(1000.0)})
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 4096, hard))
try:
    checkpoint.save(path, {"epoch": 2, "weights": torch.arange(100_000.0)})
except OSError as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
"""


def test_full_disk_keeps_previous_checkpoint(tmp_path: Path):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["type"] == "CheckpointWriteError"
    assert f"failed to write checkpoint {path}" in error["message"]
    assert "File too large" in error["message"]
    assert "ulimit -f" in error["message"]
    assert "previous checkpoint there is unchanged" in error["message"]
    assert "\n" not in error["message"]  # Ray reports only a worker error's last line
    previous = torch.load(path, weights_only=True)
    assert previous["epoch"] == 1
    assert torch.equal(previous["weights"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_NAME]


def test_save_replaces_file_by_rename(tmp_path: Path):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    checkpoint.save(path, {"epoch": 1})
    # A reader that opened the old checkpoint, such as MLflow copying it into
    # the run's artifacts, must keep reading the old file whole.
    with path.open("rb") as reader:
        checkpoint.save(path, {"epoch": 2, "weights": torch.zeros(10_000)})
        assert torch.load(reader, weights_only=True) == {"epoch": 1}
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_NAME]


# Trains two epochs and lowers the file size limit below the checkpoint's
# size after the first, so that the second epoch's checkpoint write fails.
_FIT_FULL_DISK_SCRIPT = """
import json, resource, sys
from pathlib import Path

import torch

from resmom.specs import validate_job
from resmom.train.loop import fit

spec = validate_job(json.loads(sys.argv[1]))
folder = Path(sys.argv[4])
epochs = []


def lower_limit_after_first(epoch, metrics, written):
    epochs.append(epoch)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (written.stat().st_size // 2, hard))


try:
    fit(spec, Path(sys.argv[2]), Path(sys.argv[3]), torch.device("cpu"),
        lower_limit_after_first, checkpoint_dir=folder)
except OSError as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc), "epochs": epochs}))
"""


def test_fit_stops_when_checkpoint_write_fails(digits_paths: dict[str, Path], tmp_path: Path):
    spec = _spec("byol")
    result = subprocess.run(
        [
            sys.executable, "-c", _FIT_FULL_DISK_SCRIPT, spec.model_dump_json(),
            str(digits_paths["train"]), str(digits_paths["test"]), str(tmp_path),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["type"] == "CheckpointWriteError"
    assert f"failed to write checkpoint {tmp_path / checkpoint.CHECKPOINT_NAME}" in error["message"]
    # The failed write ends the run before the epoch is reported.
    assert error["epochs"] == [1]
    saved = torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_NAME]


class _RunsCode:
    """Unpickling this object runs `exec` on a snippet that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_checkpoint_with_code_rejected(tmp_path: Path):
    spec = _spec()
    marker = tmp_path / "marker"
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    payload = {"spec": json.dumps(spec.model_dump(mode="json")), "epoch": 1}
    torch.save({**payload, "student": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=r"(?s)contains objects other than tensors.*exec"):
        checkpoint.load(path, spec)
    assert not marker.exists()


def test_corrupt_checkpoint_named(tmp_path: Path):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    checkpoint.save(path, {"epoch": 1, "weights": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        checkpoint.load(path, _spec())


def test_missing_checkpoint_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "last.pt", _spec())


def test_divergence_keeps_last_good_checkpoint(
    digits_paths: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import dataclasses

    from resmom.train import loop

    spec = _spec("byol")
    steps_per_epoch = 1437 // spec.optim.batch_size
    real_step = loop.forward_step
    calls = []

    def nan_in_second_epoch(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) <= steps_per_epoch:
            return out
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    monkeypatch.setattr(loop, "forward_step", nan_in_second_epoch)
    with pytest.raises(loop.DivergenceError, match="diverged in epoch 2.*loss/total"):
        fit(spec, digits_paths["train"], digits_paths["test"], CPU, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 1
