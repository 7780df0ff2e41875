"""Optimizers: SGD, AdamW and LARS, with the usual exclusion of biases and norms."""

from __future__ import annotations

import torch
from torch import nn

from resmom.specs import OptimSpec


def _split_decay(model: nn.Module) -> list[dict]:
    """Return two parameter groups: weights with decay, biases and norm parameters without.

    Biases and norm parameters are the 1-d tensors; BYOL and MoCo v3 exclude
    them from weight decay and from LARS adaptation.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., arXiv 1708.03888).

    The decayed gradient d = g + weight_decay * w of each parameter is scaled
    by eta * ||w|| / ||d|| before the momentum step. Groups with
    `lars_exclude` (biases, norms) skip the scaling.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ):
        if lr <= 0:
            raise ValueError(f"LARS learning rate must be positive, got {lr}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient = parameter.grad
                if group["weight_decay"]:
                    gradient = gradient.add(parameter, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    weight_norm = parameter.norm()
                    gradient_norm = gradient.norm()
                    if weight_norm > 0 and gradient_norm > 0:
                        gradient = gradient * (group["eta"] * weight_norm / gradient_norm)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(gradient).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(gradient)
                parameter.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    groups = _split_decay(model)
    if spec.optimizer == "lars":
        return LARS(
            groups,
            lr=spec.scaled_lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            eta=spec.lars_eta,
        )
    for group in groups:
        group.pop("lars_exclude", None)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.scaled_lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(
        groups, lr=spec.scaled_lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
