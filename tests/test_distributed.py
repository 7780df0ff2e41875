"""Collective helpers in real gloo processes, and their single-process fallback."""

from __future__ import annotations

import os
import socket

import pytest
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
        # Rank r contributes r + 1 rows filled with r.
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


def _mocov3_worker(rank: int, world: int, port: int, student, teacher, results) -> None:
    from resmom.ssl.losses import mocov3_loss

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = student.shape[1] // world
        local_student = student[:, rank * B : (rank + 1) * B]
        local_teacher = teacher[:, rank * B : (rank + 1) * B]
        # Gather keys as the training step does: (V, B, D) -> (B, V, D) rows -> (V, G, D).
        gathered = dist_utils.all_gather_rows(local_teacher.transpose(0, 1)).transpose(0, 1)
        loss = mocov3_loss(local_student, gathered, rank * B, temperature=0.2)
        # DDP averages gradients over ranks, i.e. it optimizes the mean of the rank losses.
        results[rank] = dist_utils.all_reduce_mean(loss.detach().view(1)).item()
    finally:
        dist.destroy_process_group()


def test_mocov3_loss_two_ranks_equals_one_rank():
    from resmom.ssl.losses import mocov3_loss

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 8, 6, generator=generator)
    teacher = torch.randn(2, 8, 6, generator=generator)
    single = mocov3_loss(student, teacher, 0, temperature=0.2).item()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            _mocov3_worker, args=(2, _free_port(), student, teacher, results), nprocs=2, join=True
        )
        results = dict(results)
    assert results[0] == pytest.approx(single, rel=1e-6)
    assert results[1] == pytest.approx(single, rel=1e-6)
