"""MoCo v2 (Chen et al., arXiv 2003.04297): heads and loss.

Queries come from the student, keys from the EMA teacher; negatives are the
keys of earlier batches kept in a queue.

NOTE: the paper computes the loss in one direction (query view a, key view b).
Here it is symmetrized over both views, as MoCo v3 does. That way the
residual term has a teacher output for every view at no extra cost.
"""

from __future__ import annotations

import torch
from torch import nn

from resmom.models.heads import mlp_no_bn
from resmom.specs import MethodSpec
from resmom.ssl.losses import mocov2_loss
from resmom.ssl.queue import KeyQueue


def heads(method: MethodSpec, feature_dim: int, vit: bool) -> tuple[nn.Module, nn.Module]:
    """Return (projector, predictor): Linear-ReLU-Linear and the identity."""
    return mlp_no_bn(feature_dim, method.projector_hidden_dim, method.projection_dim), nn.Identity()


def loss(
    prediction: torch.Tensor,
    teacher_global: torch.Tensor,
    rank_offset: int,
    method: MethodSpec,
    queue: KeyQueue,
) -> torch.Tensor:
    """InfoNCE of this rank's queries against their keys and the queue."""
    B = prediction.shape[1]
    local_teacher = teacher_global[:, rank_offset : rank_offset + B]  # (V, B, D)
    return mocov2_loss(prediction, local_teacher, queue.keys, method.temperature)
