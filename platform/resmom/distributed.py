"""Collectives that are the identity in a single process.

Core code calls these instead of torch.distributed so that the same loop
runs in one process (tests, debugging) and under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _on_backend_device(values: torch.Tensor) -> torch.Tensor:
    """Return a copy of `values` on a device the process group can reduce (CUDA for NCCL)."""
    if dist.get_backend() == "nccl" and values.device.type != "cuda":
        return values.to(torch.device("cuda", torch.cuda.current_device()))
    return values.clone()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Return the element-wise mean of `values` over ranks (a copy on the same device)."""
    if not is_distributed():
        return values.clone()
    reduced = _on_backend_device(values)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return (reduced / dist.get_world_size()).to(values.device)


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Return the element-wise maximum of `values` over ranks (a copy on the same device)."""
    if not is_distributed():
        return values.clone()
    reduced = _on_backend_device(values)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(values.device)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate (N_r, ...) tensors from every rank in rank order; N_r may differ per rank."""
    if not is_distributed():
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = rows.new_zeros((largest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])
