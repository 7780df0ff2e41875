"""Collective helpers in real gloo processes, and their single-process fallback."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resmom import distributed as dist_utils


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Rank r holds r + 1 rows filled with r.
        rows = torch.full((rank + 1, 2), float(rank))
        gathered = dist_utils.all_gather_rows(rows)
        mean = dist_utils.all_reduce_mean(torch.tensor([float(rank)]))
        largest = dist_utils.all_reduce_max(torch.tensor([float(rank)]))
        results[rank] = (
            gathered.tolist(),
            mean.item(),
            largest.item(),
            dist_utils.rank(),
            dist_utils.world_size(),
        )
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_gloo_ranks():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        results = dict(results)
    expected_rows = [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    for rank in range(world):
        gathered, mean, largest, seen_rank, seen_world = results[rank]
        assert gathered == expected_rows
        assert mean == 0.5
        assert largest == 1.0
        assert seen_rank == rank
        assert seen_world == world


def test_collectives_are_identity_in_one_process():
    rows = torch.arange(6.0).view(3, 2)
    assert torch.equal(dist_utils.all_gather_rows(rows), rows)
    assert torch.equal(dist_utils.all_reduce_mean(rows), rows)
    assert dist_utils.rank() == 0
    assert dist_utils.world_size() == 1
