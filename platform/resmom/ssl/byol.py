"""BYOL (Grill et al., arXiv 2006.07733) with the residual-momentum term (arXiv 2211.09861).

The student is backbone -> projector -> predictor; the teacher is an EMA copy
of the student's backbone and projector. The SSL loss compares the student
prediction of one view with the teacher projection of the other view; the
residual term compares them on the same view, so it reuses the teacher
outputs that the SSL loss already needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from resmom.models.heads import mlp
from resmom.models.resnet import ResNet
from resmom.specs import JobSpec
from resmom.ssl import gaps
from resmom.ssl.losses import byol_loss, residual_momentum_loss


class Encoder(nn.Module):
    """Backbone followed by the projector: the part that student and teacher share."""

    def __init__(self, backbone: ResNet, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> features (N, F), projection (N, D)."""
        features = self.backbone(images)
        return features, self.projector(features)


class Student(nn.Module):
    def __init__(self, encoder: Encoder, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> features (N, F), prediction (N, D)."""
        features, projection = self.encoder(images)
        return features, self.predictor(projection)


def build(spec: JobSpec) -> tuple[Student, Encoder]:
    """Build the student and its teacher, which starts as an exact copy without gradients."""
    backbone = ResNet(spec.model.backbone, width=spec.model.width, stem=spec.model.stem)
    method = spec.method
    projector = mlp(backbone.feature_dim, method.projector_hidden_dim, method.projection_dim)
    predictor = mlp(method.projection_dim, method.predictor_hidden_dim, method.projection_dim)
    student = Student(Encoder(backbone, projector), predictor)
    teacher = copy.deepcopy(student.encoder).requires_grad_(False)
    return student, teacher


@dataclass(frozen=True)
class StepOutput:
    """Loss to back-propagate and detached diagnostics of one training step."""

    loss: torch.Tensor
    ssl_loss: torch.Tensor
    rm_loss: torch.Tensor
    intra_cos: torch.Tensor
    inter_cos: torch.Tensor
    intra_cos_backbone: torch.Tensor
    embedding_std: torch.Tensor


def forward_step(
    student: nn.Module, teacher: Encoder, view_a: torch.Tensor, view_b: torch.Tensor, alpha: float
) -> StepOutput:
    """Compute BYOL + alpha * residual-momentum loss on two views of a batch.

    Both views go through each network in one batch of 2B, so BatchNorm
    statistics are taken over both views together.

    Args:
        student: a `Student`, possibly wrapped in DistributedDataParallel.
        teacher: the EMA encoder; run without gradient.
        view_a, view_b: (B, 3, H, W).
        alpha: weight of the residual term; 0 is plain BYOL.
    """
    B = view_a.shape[0]
    views = torch.cat([view_a, view_b])  # (V*B, 3, H, W), view-major
    student_features, prediction = student(views)
    with torch.no_grad():
        teacher_features, teacher_projection = teacher(views)

    prediction = prediction.view(2, B, -1)  # (V, B, D)
    teacher_projection = teacher_projection.view(2, B, -1)
    ssl = byol_loss(prediction, teacher_projection)
    rm = residual_momentum_loss(prediction, teacher_projection)
    loss = ssl + alpha * rm if alpha else ssl

    return StepOutput(
        loss=loss,
        ssl_loss=ssl.detach(),
        rm_loss=rm.detach(),
        intra_cos=gaps.intra_gap(prediction, teacher_projection),
        inter_cos=gaps.inter_gap(prediction, teacher_projection),
        intra_cos_backbone=gaps.intra_gap(
            student_features.detach().view(2, B, -1), teacher_features.view(2, B, -1)
        ),
        embedding_std=gaps.embedding_std(prediction.detach().flatten(0, 1)),
    )
