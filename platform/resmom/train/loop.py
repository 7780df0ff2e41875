"""The training loop that every DDP worker runs; also callable in one process.

It knows nothing about Ray or MLflow: the caller passes the device and a
callback that receives each epoch's metrics (already reduced over ranks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resmom import distributed as dist_utils
from resmom.data import digits
from resmom.data.augment import TwoViewAugment, normalize
from resmom.data.loaders import TwoViewBatches, eval_loader, train_loader
from resmom.probe.knn import knn_top1
from resmom.specs import JobSpec
from resmom.ssl import byol
from resmom.ssl.ema import ema_update
from resmom.train.schedules import cosine_momentum, warmup_cosine_lr

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]

# Per-step diagnostics averaged over an epoch, in the order they are stacked.
_STEP_KEYS = (
    "loss/total",
    "loss/ssl",
    "loss/rm",
    "gap/intra_cos",
    "gap/inter_cos",
    "gap/intra_cos_backbone",
    "collapse/embedding_std",
)
_EVAL_BATCH = 256


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_INFO = {"digits": DatasetInfo(digits.NUM_CLASSES, digits.MEAN, digits.STD)}


class DivergenceError(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class _State:
    spec: JobSpec
    student: byol.Student
    model: nn.Module  # the student, wrapped in DDP when distributed
    teacher: byol.Encoder
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    step: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.spec.optim.epochs


def _train_epoch(state: _State, batches: TwoViewBatches) -> dict[str, float]:
    spec = state.spec
    warmup_steps = round(spec.optim.warmup_epochs * state.steps_per_epoch)
    sums = torch.zeros(len(_STEP_KEYS))
    wait = 0.0
    state.model.train()
    state.teacher.train()
    started = time.perf_counter()
    ready = started
    lr = momentum = 0.0

    for view_a, view_b, _ in batches:
        wait += time.perf_counter() - ready

        # Schedules are functions of the global step, applied before the update.
        lr = warmup_cosine_lr(state.step, state.total_steps, warmup_steps, spec.optim.lr)
        momentum = cosine_momentum(state.step, state.total_steps, spec.method.momentum_base)
        for group in state.optimizer.param_groups:
            group["lr"] = lr

        # Student update on BYOL + alpha * RM.
        out = byol.forward_step(state.model, state.teacher, view_a, view_b, spec.rm.alpha)
        state.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        state.optimizer.step()

        # Teacher follows the student right after the optimizer step.
        ema_update(state.teacher, state.student.encoder, momentum)
        state.step += 1

        values = (
            out.loss.detach(),
            out.ssl_loss,
            out.rm_loss,
            out.intra_cos,
            out.inter_cos,
            out.intra_cos_backbone,
            out.embedding_std,
        )
        sums += torch.stack(values).float().cpu()
        ready = time.perf_counter()

    elapsed = time.perf_counter() - started
    means = dist_utils.all_reduce_mean(sums / state.steps_per_epoch)
    if not torch.isfinite(means).all():
        raise DivergenceError(f"loss is not finite after step {state.step}: {means.tolist()}")
    metrics = dict(zip(_STEP_KEYS, means.tolist(), strict=True))
    slowest = dist_utils.all_reduce_max(torch.tensor([elapsed])).item()
    wait_frac = dist_utils.all_reduce_mean(torch.tensor([wait / elapsed])).item()
    metrics.update(
        {
            "sched/lr": lr,
            "sched/momentum": momentum,
            "sched/alpha": spec.rm.alpha,
            "perf/img_per_s": state.steps_per_epoch * spec.optim.batch_size / slowest,
            "perf/data_wait_frac": wait_frac,
        }
    )
    return metrics


@torch.no_grad()
def _features(backbone: nn.Module, loader, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Return backbone features and labels of this rank's shard, gathered from all ranks."""
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone(normalize(images, info.mean, info.std)))
        labels.append(targets.long())
    local_features = torch.cat(features)
    local_labels = torch.cat(labels)
    return dist_utils.all_gather_rows(local_features), dist_utils.all_gather_rows(local_labels)


def _knn_metrics(state: _State, bank_loader, query_loader, info: DatasetInfo) -> dict[str, float]:
    probe = state.spec.probe
    accuracy = {}
    for name, backbone in (
        ("student", state.student.encoder.backbone),
        ("teacher", state.teacher.backbone),
    ):
        was_training = backbone.training
        backbone.eval()
        bank, bank_labels = _features(backbone, bank_loader, info)
        queries, query_labels = _features(backbone, query_loader, info)
        backbone.train(was_training)
        accuracy[name] = knn_top1(
            bank,
            bank_labels,
            queries,
            query_labels,
            probe.knn_k,
            probe.knn_temperature,
            info.num_classes,
        )
    return {
        "probe/knn_top1_student": accuracy["student"],
        "probe/knn_top1_teacher": accuracy["teacher"],
        "probe/knn_gap": accuracy["teacher"] - accuracy["student"],
    }


def fit(
    spec: JobSpec,
    train_path: Path,
    test_path: Path,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
) -> dict[str, float]:
    """Train `spec` on this process's share of the data; return the last epoch's metrics.

    Under an initialized process group the student is wrapped in DDP and
    each rank reads its own shard; otherwise this is plain single-process
    training. `on_epoch(epoch, metrics)` runs on every rank with the same
    reduced metrics.
    """
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if world != spec.run.workers:
        log.warning("spec asks for %d workers but %d are running", spec.run.workers, world)
    info = DATASET_INFO[spec.data.dataset]
    batch_per_rank = spec.optim.batch_size // world

    torch.manual_seed(spec.seed)
    student, teacher = byol.build(spec)
    student.to(device)
    teacher.to(device)
    model: nn.Module = student
    if dist_utils.is_distributed():
        model = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=spec.optim.lr,
        momentum=spec.optim.momentum,
        weight_decay=spec.optim.weight_decay,
    )

    threads = spec.data.loader_threads
    loader = train_loader(train_path, batch_per_rank, spec.seed, world > 1, threads, device)
    if len(loader) == 0:
        raise ValueError(
            f"optim.batch_size {spec.optim.batch_size} is larger than the training split "
            f"({loader.reader.num_samples} images); lower it"
        )
    # Each rank draws its own augmentations; the seed makes them reproducible.
    augment = TwoViewAugment(
        spec.data.augment,
        spec.data.resolution,
        info.mean,
        info.std,
        seed=spec.seed * 1009 + rank,
        device=device,
    )
    batches = TwoViewBatches(loader, augment)
    bank_loader = eval_loader(train_path, _EVAL_BATCH, rank, world, threads, device)
    query_loader = eval_loader(test_path, _EVAL_BATCH, rank, world, threads, device)

    state = _State(spec, student, model, teacher, optimizer, steps_per_epoch=len(loader))
    metrics: dict[str, float] = {}
    for epoch in range(1, spec.optim.epochs + 1):
        metrics = _train_epoch(state, batches)
        metrics.update(_knn_metrics(state, bank_loader, query_loader, info))
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f (ssl %.4f, rm %.4f)  intra gap %.4f  "
                "kNN student %.3f teacher %.3f  %.0f img/s",
                epoch,
                spec.optim.epochs,
                metrics["loss/total"],
                metrics["loss/ssl"],
                metrics["loss/rm"],
                metrics["gap/intra_cos"],
                metrics["probe/knn_top1_student"],
                metrics["probe/knn_top1_teacher"],
                metrics["perf/img_per_s"],
            )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics
