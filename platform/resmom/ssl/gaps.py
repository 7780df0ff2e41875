"""Student-teacher gap diagnostics (no gradient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def intra_gap(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Return the mean 1 - cos(student_v, teacher_v) over views v and samples.

    Args:
        student, teacher: (V, B, D).
    """
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


@torch.no_grad()
def inter_gap(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Return the mean 1 - cos(student_v, teacher_w) over pairs of different views v != w.

    Args:
        student, teacher: (V, B, D).
    """
    V = student.shape[0]
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher, dim=-1)
    cos = torch.einsum("vbd,wbd->vwb", s, t)  # (V, V, B): every view pair, per sample
    off_diagonal = ~torch.eye(V, dtype=torch.bool, device=cos.device)
    return (1 - cos[off_diagonal]).mean()


@torch.no_grad()
def embedding_std(projection: torch.Tensor) -> torch.Tensor:
    """Return the mean per-dimension std of L2-normalized embeddings (B, D).

    Collapse to a constant drives it to 0; a healthy D-dimensional embedding
    sits near 1 / sqrt(D) (the collapse check of SimSiam, arXiv 2011.10566).
    """
    return F.normalize(projection, dim=-1).std(dim=0).mean()
