"""Schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Return the learning rate: linear warm-up from 0 to `base_lr`, then cosine decay to 0."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """Return the EMA coefficient, rising from `base` at step 0 to 1 at the last step.

    tau = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2, as in BYOL
    (arXiv 2006.07733).
    """
    progress = min(1.0, step / max(1, total_steps))
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def constant_momentum(step: int, total_steps: int, base: float) -> float:
    """Return `base` at every step (MoCo v2)."""
    return base


def alpha_at(
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    alpha: float,
    schedule: str,
    warmup_epochs: float,
) -> float:
    """Return the residual weight at `step`.

    constant: alpha throughout. warmup: linear from 0 to alpha over
    `warmup_epochs`, then alpha. cosine: from alpha at step 0 down to 0 at the
    last step, following half a cosine.
    """
    if schedule == "constant":
        return alpha
    if schedule == "warmup":
        warmup_steps = warmup_epochs * steps_per_epoch
        return alpha if step >= warmup_steps else alpha * step / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, step / max(1, total_steps))
        return alpha * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown alpha schedule {schedule!r}; accepted: constant, warmup, cosine")
