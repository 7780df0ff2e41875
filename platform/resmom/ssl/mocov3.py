"""MoCo v3 (Chen, Xie, He, arXiv 2104.02057): heads and loss.

Like BYOL it has a projector and a predictor. The loss is InfoNCE over the
global batch, with the teacher keys gathered from every rank and no queue.
"""

from __future__ import annotations

import torch
from torch import nn

from resmom.models.heads import mlp_last_bn
from resmom.specs import MethodSpec
from resmom.ssl.losses import mocov3_loss


def heads(method: MethodSpec, feature_dim: int, vit: bool) -> tuple[nn.Module, nn.Module]:
    """Return (projector, predictor): 2 or 3 layers (ResNet or ViT), then 2 layers."""
    hidden, out = method.projector_hidden_dim, method.projection_dim
    projector = mlp_last_bn(feature_dim, hidden, out, layers=3 if vit else 2)
    predictor = mlp_last_bn(out, method.predictor_hidden_dim, out, layers=2)
    return projector, predictor


def loss(
    prediction: torch.Tensor,
    teacher_global: torch.Tensor,
    rank_offset: int,
    method: MethodSpec,
    queue,
) -> torch.Tensor:
    """Symmetrized InfoNCE of this rank's queries against the global batch of keys."""
    return mocov3_loss(prediction, teacher_global, rank_offset, method.temperature)
