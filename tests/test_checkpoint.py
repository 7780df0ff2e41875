"""Checkpoint, crash, resume: the resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

import json
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


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    checkpoint.save(path, {"epoch": 1})

    class Unpicklable:
        def __reduce__(self):
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(path, {"epoch": 2, "bad": Unpicklable()})
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_NAME]


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
