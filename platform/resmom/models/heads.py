"""MLP heads used as projectors and predictors."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear, the projector and predictor of BYOL (arXiv 2006.07733)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def mlp_no_bn(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-ReLU-Linear, the projector of MoCo v2 (arXiv 2003.04297)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def mlp_last_bn(in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    """MoCo v3's MLP: bias-free linears, BN-ReLU between them, a final BN without affine.

    The layout follows facebookresearch/moco-v3 (moco/builder.py): the
    projector has 2 layers on ResNets and 3 on ViTs, the predictor 2.
    """
    modules: list[nn.Module] = []
    for index in range(layers):
        last = index == layers - 1
        source = in_dim if index == 0 else hidden_dim
        target = out_dim if last else hidden_dim
        modules.append(nn.Linear(source, target, bias=False))
        if last:
            modules.append(nn.BatchNorm1d(target, affine=False))
        else:
            modules += [nn.BatchNorm1d(target), nn.ReLU(inplace=True)]
    return nn.Sequential(*modules)
