"""Student and teacher networks shared by all methods."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Encoder(nn.Module):
    """Backbone followed by the projector: the part that student and teacher share."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, B, 3, H, W) -> features (V, B, F), projection (V, B, D).

        Each view is a separate forward pass, so BatchNorm statistics are
        per view, as in BYOL and MoCo v3 where each view is encoded on its own.
        """
        features = torch.stack([self.backbone(view) for view in views])
        projection = torch.stack([self.projector(f) for f in features])
        return features, projection


class Student(nn.Module):
    """Encoder plus predictor; the predictor is the identity for MoCo v2."""

    def __init__(self, encoder: Encoder, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, B, 3, H, W) -> features (V, B, F), prediction (V, B, D)."""
        features, projection = self.encoder(views)
        prediction = torch.stack([self.predictor(p) for p in projection])
        return features, prediction


def make_teacher(student: Student) -> Encoder:
    """Return an exact copy of the student's encoder without gradients."""
    return copy.deepcopy(student.encoder).requires_grad_(False)
