"""The queue of negative keys of MoCo v2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """A ring buffer of K normalized keys; the oldest block is replaced first.

    Kept as module buffers so that it lands in checkpoints with the model.
    The queue starts with random unit vectors, as MoCo does.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        # A host copy of `pointer`: reading the buffer each step would make the
        # host wait for the GPU. It is read from the buffer once after a load.
        self._start: int | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._start = None

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Replace the oldest rows with `keys` (N, D); N must divide the queue size."""
        size = self.keys.shape[0]
        count = keys.shape[0]
        if size % count:
            raise ValueError(f"{count} keys per step do not divide the queue size {size}")
        start = int(self.pointer) if self._start is None else self._start
        self.keys[start : start + count] = F.normalize(keys, dim=1)
        self._start = (start + count) % size
        self.pointer.fill_(self._start)
