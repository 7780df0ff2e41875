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


def infonce(
    queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return the InfoNCE loss: cross-entropy of each query over all keys, mean over queries.

    Args:
        queries: (B, D) student outputs.
        keys: (N, D) teacher outputs and negatives; no gradient flows into them.
        positives: (B,) index into `keys` of each query's positive key.
        temperature: softmax temperature.
    """
    queries = F.normalize(queries, dim=-1)
    keys = F.normalize(keys.detach(), dim=-1)
    logits = queries @ keys.T / temperature  # (B, N)
    return F.cross_entropy(logits, positives)


def mocov3_loss(
    student: torch.Tensor, teacher_global: torch.Tensor, rank_offset: int, temperature: float
) -> torch.Tensor:
    """Return MoCo v3's symmetrized contrastive loss (arXiv 2104.02057).

    Each query of view v is contrasted with the keys of the other view over
    the global batch, which is gathered from all ranks. Its positive is the
    key of the same image. Each term is scaled by 2 * temperature, as in
    facebookresearch/moco-v3, and the two directions are summed.

    Args:
        student: (V=2, B, D) local predictions.
        teacher_global: (V=2, G, D) teacher projections of the global batch, rank-major.
        rank_offset: index of this rank's first sample in the global batch (rank * B).
    """
    B = student.shape[1]
    positives = torch.arange(B, device=student.device) + rank_offset
    loss_a = infonce(student[0], teacher_global[1], positives, temperature)
    loss_b = infonce(student[1], teacher_global[0], positives, temperature)
    return (loss_a + loss_b) * 2 * temperature


def mocov2_loss(
    student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return MoCo v2's InfoNCE against a queue of negatives, symmetrized over the two views.

    The positive of the query of view v is the teacher key of the other view
    of the same image. The negatives are the queued keys of earlier batches.

    Args:
        student: (V=2, B, D) queries.
        teacher: (V=2, B, D) keys of this batch.
        queue: (K, D) normalized keys of earlier batches.
    """
    B = student.shape[1]
    zero = torch.zeros(B, dtype=torch.long, device=student.device)
    total = student.new_zeros(())
    negatives_bank = F.normalize(queue.detach(), dim=-1)
    for view, other in ((0, 1), (1, 0)):
        queries = F.normalize(student[view], dim=-1)
        keys = F.normalize(teacher[other].detach(), dim=-1)
        positive = (queries * keys).sum(-1, keepdim=True)  # (B, 1)
        negatives = queries @ negatives_bank.T  # (B, K)
        logits = torch.cat([positive, negatives], dim=1) / temperature  # positive at index 0
        total = total + F.cross_entropy(logits, zero)
    return total / 2


def residual_distance(
    student: torch.Tensor, teacher: torch.Tensor, distance: str, kd_temperature: float = 0.1
) -> torch.Tensor:
    """Return the residual-momentum term: same view, stop-gradient teacher, chosen distance.

    Args:
        student, teacher: (V, B, D).
        distance: `cosine` (2 - 2 cos, the paper's), `l2` (squared Euclidean
            distance of the raw outputs, summed over D) or `kd` (cross-entropy
            from softmax(teacher / t) to softmax(student / t) over D).
    """
    _check_views(student, teacher)
    teacher = teacher.detach()
    if distance == "cosine":
        return normalized_mse(student, teacher).mean()
    if distance == "l2":
        return (student - teacher).pow(2).sum(-1).mean()
    if distance == "kd":
        target = F.softmax(teacher / kd_temperature, dim=-1)
        return -(target * F.log_softmax(student / kd_temperature, dim=-1)).sum(-1).mean()
    raise ValueError(f"unknown residual distance {distance!r}; accepted: cosine, l2, kd")
