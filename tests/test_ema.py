from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from resmom.ssl.ema import ema_update
from resmom.train.schedules import cosine_momentum, warmup_cosine_lr


def _pair() -> tuple[nn.Module, nn.Module]:
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        student[1].running_mean.fill_(0.5)
        student[1].num_batches_tracked.fill_(7)
    return teacher, student


def test_ema_matches_hand_computation():
    teacher, student = _pair()
    ema_update(teacher, student, momentum=0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2 for every parameter.
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.2))
    ema_update(teacher, student, momentum=0.5)
    # 0.5 * 1.2 + 0.5 * 3 = 2.1
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 2.1))


def test_ema_copies_buffers():
    teacher, student = _pair()
    ema_update(teacher, student, momentum=0.99)
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 0.5))
    assert teacher[1].num_batches_tracked.item() == 7


def test_ema_momentum_one_keeps_teacher():
    teacher, student = _pair()
    ema_update(teacher, student, momentum=1.0)
    assert all(torch.equal(p, torch.ones_like(p)) for p in teacher.parameters())


def test_ema_momentum_zero_copies_student():
    teacher, student = _pair()
    ema_update(teacher, student, momentum=0.0)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(t, s)


def test_ema_rejects_mismatched_modules():
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 3), nn.Linear(3, 2), momentum=0.5)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), momentum=0.5)


def test_ema_rejects_momentum_outside_unit_interval():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, momentum=1.5)


def test_cosine_momentum_endpoints_and_midpoint():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_warmup_cosine_lr():
    assert warmup_cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(55, 100, 10, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine_lr(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
