"""The teacher as an exponential moving average (EMA) of the student."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Move teacher parameters toward the student's: t <- momentum * t + (1 - momentum) * s.

    Buffers (BatchNorm running statistics) are copied, not averaged, as BYOL
    and MoCo do. Call this right after a real optimizer step.

    Raises:
        ValueError: if the two modules do not have the same parameters.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        if t.shape != s.shape:
            raise ValueError(
                f"teacher and student parameters differ in shape: {t.shape} vs {s.shape}"
            )
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)
