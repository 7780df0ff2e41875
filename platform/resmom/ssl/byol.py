"""BYOL (Grill et al., arXiv 2006.07733): heads and loss.

The student regresses its prediction of one view onto the teacher's
projection of the other view; no negatives, no queue.
"""

from __future__ import annotations

import torch
from torch import nn

from resmom.models.heads import mlp
from resmom.specs import MethodSpec
from resmom.ssl.losses import byol_loss


def heads(method: MethodSpec, feature_dim: int, vit: bool) -> tuple[nn.Module, nn.Module]:
    """Return (projector, predictor): Linear-BN-ReLU-Linear each."""
    projector = mlp(feature_dim, method.projector_hidden_dim, method.projection_dim)
    predictor = mlp(method.projection_dim, method.predictor_hidden_dim, method.projection_dim)
    return projector, predictor


def loss(
    prediction: torch.Tensor,
    teacher_global: torch.Tensor,
    rank_offset: int,
    method: MethodSpec,
    queue,
) -> torch.Tensor:
    """Symmetrized BYOL loss on this rank's samples; (V, B, D) and (V, G, D) inputs."""
    B = prediction.shape[1]
    local_teacher = teacher_global[:, rank_offset : rank_offset + B]  # (V, B, D)
    return byol_loss(prediction, local_teacher)
