"""One training step of any method: SSL loss + alpha * residual-momentum term.

The residual term and the gap diagnostics reuse the teacher outputs that
the SSL loss needs anyway, so they add no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from resmom import distributed as dist_utils
from resmom.models.resnet import ResNet
from resmom.models.vit import VisionTransformer, build_backbone
from resmom.specs import JobSpec
from resmom.ssl import byol, gaps, mocov2, mocov3
from resmom.ssl.losses import residual_distance
from resmom.ssl.networks import Encoder, Student, make_teacher
from resmom.ssl.queue import KeyQueue

METHODS: dict[str, ModuleType] = {"byol": byol, "mocov2": mocov2, "mocov3": mocov3}


@dataclass
class Networks:
    student: Student
    teacher: Encoder
    queue: KeyQueue | None


def build(spec: JobSpec) -> Networks:
    """Build the student, its teacher (an exact copy without gradients) and the queue if any."""
    backbone: ResNet | VisionTransformer = build_backbone(spec.model, spec.data.resolution)
    projector, predictor = METHODS[spec.method.name].heads(
        spec.method, backbone.feature_dim, vit=isinstance(backbone, VisionTransformer)
    )
    student = Student(Encoder(backbone, projector), predictor)
    queue = None
    if spec.method.queue_size:
        queue = KeyQueue(spec.method.queue_size, spec.method.projection_dim)
    return Networks(student, make_teacher(student), queue)


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
    teacher_keys: torch.Tensor  # (V, G, D): the global batch of teacher projections
    student_features: torch.Tensor  # (V, B, F), detached: input of the online linear probe


def forward_step(
    student: nn.Module,
    teacher: Encoder,
    queue: KeyQueue | None,
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    spec: JobSpec,
    alpha: float,
) -> StepOutput:
    """Compute the method's loss plus alpha times the residual term on two views.

    Args:
        student: a `Student`, possibly wrapped in DistributedDataParallel.
        teacher: the EMA encoder; run without gradient.
        queue: MoCo v2's negatives, else None.
        view_a, view_b: (B, 3, H, W).
        alpha: the residual weight at this step; 0 skips the term's gradient.
    """
    B = view_a.shape[0]
    views = torch.stack([view_a, view_b])  # (V, B, 3, H, W)
    student_features, prediction = student(views)
    with torch.no_grad():
        teacher_features, teacher_projection = teacher(views)
        # MoCo needs every rank's keys (v3: in the loss; v2: to enqueue); BYOL only its own.
        if spec.method.name == "byol":
            teacher_global = teacher_projection
        else:
            teacher_global = dist_utils.all_gather_rows(
                teacher_projection.transpose(0, 1)
            ).transpose(0, 1)
    rank_offset = dist_utils.rank() * B if spec.method.name != "byol" else 0

    method = METHODS[spec.method.name]
    ssl = method.loss(prediction, teacher_global, rank_offset, spec.method, queue)

    rm_spec = spec.rm
    if rm_spec.level == "output":
        rm_student, rm_teacher = prediction, teacher_projection
    else:
        rm_student, rm_teacher = student_features, teacher_features
    rm = residual_distance(rm_student, rm_teacher, rm_spec.distance, rm_spec.kd_temperature)
    loss = ssl + alpha * rm if alpha else ssl

    return StepOutput(
        loss=loss,
        ssl_loss=ssl.detach(),
        rm_loss=rm.detach(),
        intra_cos=gaps.intra_gap(rm_student.detach(), rm_teacher),
        inter_cos=gaps.inter_gap(rm_student.detach(), rm_teacher),
        intra_cos_backbone=gaps.intra_gap(student_features.detach(), teacher_features),
        embedding_std=gaps.embedding_std(prediction.detach().flatten(0, 1)),
        teacher_keys=teacher_global,
        student_features=student_features.detach(),
    )
