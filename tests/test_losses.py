from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from resmom.ssl import gaps
from resmom.ssl.losses import byol_loss, normalized_mse, residual_momentum_loss


def _naive_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def test_rm_loss_zero_when_outputs_equal():
    outputs = torch.randn(2, 5, 8)
    assert residual_momentum_loss(outputs, outputs.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_rm_loss_ignores_scale():
    outputs = torch.randn(2, 5, 8)
    assert residual_momentum_loss(outputs, 3.0 * outputs).item() == pytest.approx(0.0, abs=1e-6)


def test_rm_loss_matches_hand_values():
    # One view, one sample: orthogonal vectors have cos 0 -> 2; opposite -> 4.
    student = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0]], [[-1.0, 0.0]]])
    assert residual_momentum_loss(student, teacher).item() == pytest.approx((2.0 + 4.0) / 2)


def test_rm_loss_uses_same_view_only():
    student = torch.randn(2, 4, 6)
    teacher = torch.randn(2, 4, 6)
    expected = (
        sum(2 - 2 * _naive_cos(student[v, b], teacher[v, b]) for v in range(2) for b in range(4))
        / 8
    )
    assert residual_momentum_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_rm_loss_gradient_reaches_student_only():
    student = torch.randn(2, 4, 6, requires_grad=True)
    teacher = torch.randn(2, 4, 6, requires_grad=True)
    residual_momentum_loss(student, teacher).backward()
    assert student.grad is not None
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_byol_loss_is_cross_view_sum():
    student = torch.randn(2, 3, 5)
    teacher = torch.randn(2, 3, 5)
    expected = (
        sum(
            2
            - 2 * _naive_cos(student[0, b], teacher[1, b])
            + 2
            - 2 * _naive_cos(student[1, b], teacher[0, b])
            for b in range(3)
        )
        / 3
    )
    assert byol_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_byol_loss_symmetric_in_view_order():
    student = torch.randn(2, 3, 5)
    teacher = torch.randn(2, 3, 5)
    swapped = byol_loss(student.flip(0), teacher.flip(0))
    assert byol_loss(student, teacher).item() == pytest.approx(swapped.item(), rel=1e-6)


def test_byol_loss_gradient_reaches_student_only():
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5, requires_grad=True)
    byol_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match=r"\(V, B, D\)"):
        residual_momentum_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 4))


def test_normalized_mse_range():
    x = torch.randn(100, 7)
    values = normalized_mse(x, torch.randn(100, 7))
    assert values.min() >= 0
    assert values.max() <= 4 + 1e-6


def test_intra_and_inter_gap_by_hand():
    # View 0 of the student equals view 0 of the teacher; view 1 is opposite.
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    student = torch.stack([a, a]).view(2, 1, 2)
    teacher = torch.stack([a, -a]).view(2, 1, 2)
    assert gaps.intra_gap(student, teacher).item() == pytest.approx((0 + 2) / 2)
    # Pairs (0, 1) and (1, 0): cos(a, -a) = -1 and cos(a, a) = 1.
    assert gaps.inter_gap(student, teacher).item() == pytest.approx((2 + 0) / 2)
    orthogonal = torch.stack([b, b]).view(2, 1, 2)
    assert gaps.intra_gap(student, orthogonal).item() == pytest.approx(1.0)


def test_embedding_std_of_collapsed_and_spread():
    collapsed = torch.ones(64, 16)
    assert gaps.embedding_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    spread = F.normalize(torch.randn(4096, 16), dim=1)
    assert gaps.embedding_std(spread).item() == pytest.approx(1 / math.sqrt(16), rel=0.1)
