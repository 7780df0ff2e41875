"""Offline linear probe: a linear classifier on frozen backbone features.

Features of the whole train and test splits are extracted once (no
augmentation), then a softmax classifier is fit on them with L-BFGS; the
backbone receives no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iterations: int = 200,
) -> nn.Linear:
    """Fit a multinomial logistic regression on standardized features with full-batch L-BFGS.

    Args:
        train_features: (N, F); train_labels: (N,).
    """
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6)
    inputs = (train_features - mean) / std
    head = nn.Linear(inputs.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iterations, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(inputs), train_labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    # Fold the standardization into the layer so it applies to raw features.
    with torch.no_grad():
        head.weight.div_(std)
        head.bias.sub_((head.weight * mean).sum(1))
    return head


@torch.no_grad()
def top1(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the top-1 accuracy in [0, 1] of `head` on (N, F) features."""
    return (head(features).argmax(1) == labels).float().mean().item()
