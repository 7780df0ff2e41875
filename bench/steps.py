"""Training steps that the benchmarks time: ours (any method) and lightly's BYOL.

Each stepper owns its networks, optimizer and two fixed random views, so a
benchmark can alternate steppers and time only the step itself.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from resmom.models.vit import build_backbone
from resmom.specs import JobSpec, validate_job
from resmom.ssl.ema import ema_update
from resmom.ssl.step import build, forward_step
from resmom.train.optim import build_optimizer


@dataclass(frozen=True)
class StepSetup:
    """Settings that both sides of a comparison share: backbone, heads, batch, device, precision."""

    backbone: str = "resnet18"
    width: int = 16
    resolution: int = 32
    batch: int = 64
    hidden_dim: int = 512
    projection_dim: int = 128
    device: str = "cpu"
    precision: str = "fp32"  # fp32 or bf16 (autocast)

    @classmethod
    def for_device(cls, device: str) -> StepSetup:
        """CPU: a narrow ResNet-18 at 32 px. CUDA: ResNet-50 at 224 px in bf16, batch 256."""
        if device == "cuda":
            return cls("resnet50", 64, 224, 256, 4096, 256, "cuda", "bf16")
        return cls()


def job_spec(setup: StepSetup, method: str, alpha: float) -> JobSpec:
    fields: dict = {
        "name": method,
        "projector_hidden_dim": setup.hidden_dim,
        "projection_dim": setup.projection_dim,
    }
    if method == "mocov2":
        fields["queue_size"] = 4 * setup.batch
    else:
        fields["predictor_hidden_dim"] = setup.hidden_dim
    stem = "cifar" if setup.resolution <= 64 else "imagenet"
    return validate_job(
        {
            "name": f"bench-{method}",
            "data": {"resolution": setup.resolution},
            "model": {"backbone": setup.backbone, "width": setup.width, "stem": stem},
            "method": fields,
            "rm": {"alpha": alpha},
            "optim": {"batch_size": setup.batch, "precision": setup.precision},
            "run": {"workers": 1},
        }
    )


def _views(setup: StepSetup) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (2, setup.batch, 3, setup.resolution, setup.resolution)
    return torch.randn(shape, device=setup.device).unbind(0)


def _autocast(setup: StepSetup):
    return torch.autocast(setup.device, dtype=torch.bfloat16, enabled=setup.precision == "bf16")


def _sync(setup: StepSetup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


class OurStep:
    """One step of our trainer's inner loop: forward_step, backward, optimizer, EMA, queue."""

    def __init__(self, setup: StepSetup, method: str = "byol", alpha: float = 0.0) -> None:
        torch.manual_seed(0)
        self.setup = setup
        self.spec = job_spec(setup, method, alpha)
        self.alpha = alpha
        self.networks = build(self.spec)
        self.networks.student.to(setup.device)
        self.networks.teacher.to(setup.device)
        if self.networks.queue is not None:
            self.networks.queue.to(setup.device)
        self.optimizer = build_optimizer(self.networks.student, self.spec.optim)
        self.views = _views(setup)

    def step(self) -> float:
        started = time.perf_counter()
        networks = self.networks
        with _autocast(self.setup):
            out = forward_step(
                networks.student,
                networks.teacher,
                networks.queue,
                *self.views,
                self.spec,
                self.alpha,
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        ema_update(networks.teacher, networks.student.encoder, 0.99)
        if networks.queue is not None:
            networks.queue.push(out.teacher_keys.flatten(0, 1))
        _sync(self.setup)
        return time.perf_counter() - started


class LightlyBYOLStep:
    """The same BYOL step built from lightly's modules, as lightly's BYOL example composes them.

    The backbone is the same module class as ours, so the two sides differ
    only in heads, loss, EMA and optimizer code.
    """

    def __init__(self, setup: StepSetup) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum

        torch.manual_seed(0)
        self.setup = setup
        spec = job_spec(setup, "byol", 0.0)
        self.backbone = build_backbone(spec.model, spec.data.resolution).to(setup.device)
        dims = (setup.hidden_dim, setup.projection_dim)
        self.projector = BYOLProjectionHead(self.backbone.feature_dim, *dims).to(setup.device)
        self.predictor = BYOLPredictionHead(setup.projection_dim, *dims).to(setup.device)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projector_momentum = copy.deepcopy(self.projector)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projector_momentum)
        self.update_momentum = update_momentum
        self.criterion = NegativeCosineSimilarity()
        parameters = nn.ModuleList([self.backbone, self.projector, self.predictor]).parameters()
        self.optimizer = torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.views = _views(setup)

    def _online(self, view: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(view).flatten(start_dim=1)))

    def _momentum(self, view: torch.Tensor) -> torch.Tensor:
        features = self.backbone_momentum(view).flatten(start_dim=1)
        return self.projector_momentum(features).detach()

    def step(self) -> float:
        started = time.perf_counter()
        self.update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        self.update_momentum(self.projector, self.projector_momentum, m=0.99)
        view_a, view_b = self.views
        with _autocast(self.setup):
            prediction_a, prediction_b = self._online(view_a), self._online(view_b)
            with torch.no_grad():
                target_a, target_b = self._momentum(view_a), self._momentum(view_b)
            loss = 0.5 * (
                self.criterion(prediction_a, target_b) + self.criterion(prediction_b, target_a)
            )
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.setup)
        return time.perf_counter() - started
