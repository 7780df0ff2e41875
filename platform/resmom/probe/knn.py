"""Weighted kNN classification on L2-normalized features.

The vote of each of the k nearest training samples is exp(cos / temperature)
(Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", arXiv 1805.01978).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> float:
    """Return the top-1 accuracy (in [0, 1]) of weighted kNN.

    Args:
        bank: (N, F) training features; bank_labels: (N,).
        queries: (M, F) test features; query_labels: (M,).
    """
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("kNN needs a non-empty feature bank and query set")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk]
        similarity, index = (block @ bank.T).topk(k, dim=1)  # (M', k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(block.shape[0], num_classes, device=block.device)
        votes.scatter_add_(1, bank_labels[index], weights)
        correct += (votes.argmax(dim=1) == query_labels[start : start + chunk]).sum().item()
    return correct / queries.shape[0]
