"""Loss terms as pure functions of student and teacher outputs.

Shapes: V views (2), B samples per rank, D embedding size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_views(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape or student.ndim != 3:
        raise ValueError(
            f"student and teacher outputs must both be (V, B, D), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )


def normalized_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return 2 - 2 cos(x, y) along the last axis: the squared distance of the unit vectors.

    Args:
        x, y: (..., D).
    Returns:
        (...,), in [0, 4].
    """
    return 2 - 2 * F.cosine_similarity(x, y, dim=-1)


def byol_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Return BYOL's symmetrized cross-view loss (arXiv 2006.07733).

    The student prediction of each view is regressed onto the teacher
    projection of the other view; the two terms are summed, as in the paper.

    Args:
        student: (V=2, B, D) predictions.
        teacher: (V=2, B, D) projections; no gradient flows into them.
    """
    _check_views(student, teacher)
    if student.shape[0] != 2:
        raise ValueError(f"BYOL uses exactly 2 views, got {student.shape[0]}")
    teacher = teacher.detach()
    return (
        normalized_mse(student[0], teacher[1]).mean()
        + normalized_mse(student[1], teacher[0]).mean()
    )


def residual_momentum_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Return the intra-representation gap term of residual momentum (arXiv 2211.09861).

    It pulls the student's output of each view toward the stop-gradient
    teacher output of the same view: mean over views and samples of
    2 - 2 cos(student_v, teacher_v).

    Args:
        student: (V, B, D) student outputs at the layer the SSL loss uses.
        teacher: (V, B, D) teacher outputs of the same views.
    """
    _check_views(student, teacher)
    return normalized_mse(student, teacher.detach()).mean()
