"""The training loop that every DDP worker runs; also callable in one process.

It imports neither Ray nor MLflow: the caller passes the device and a
callback that receives each epoch's metrics (already reduced over ranks).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resmom import distributed as dist_utils
from resmom.data.augment import TwoViewAugment
from resmom.data.beton import check_beton, spec_options
from resmom.data.loaders import TwoViewBatches, eval_loader, train_loader
from resmom.data.registry import DatasetInfo, dataset_info
from resmom.probe.features import extract_features
from resmom.probe.knn import knn_top1
from resmom.specs import JobSpec
from resmom.ssl.ema import ema_update
from resmom.ssl.step import Networks, build, forward_step
from resmom.train import checkpoint
from resmom.train.optim import build_optimizer
from resmom.train.schedules import alpha_at, constant_momentum, cosine_momentum, warmup_cosine_lr

log = logging.getLogger(__name__)

# epoch, metrics, checkpoint written this epoch (rank 0) or None.
EpochCallback = Callable[[int, dict[str, float], Path | None], None]

# Per-step diagnostics averaged over an epoch, in the order they are stacked.
_STEP_KEYS = (
    "loss/total",
    "loss/ssl",
    "loss/rm",
    "gap/intra_cos",
    "gap/inter_cos",
    "gap/intra_cos_backbone",
    "collapse/embedding_std",
    "probe/online_top1",
)
_EVAL_BATCH = 256
_MOMENTUM_SCHEDULES = {"cosine": cosine_momentum, "constant": constant_momentum}
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DivergenceError(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class _State:
    spec: JobSpec
    networks: Networks
    model: nn.Module  # the student, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    augment: TwoViewAugment
    scaler: torch.amp.GradScaler  # a pass-through unless precision is fp16
    online_head: nn.Module  # linear classifier on detached student features
    online_optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.spec.optim.epochs


def _train_epoch(state: _State, batches: TwoViewBatches) -> dict[str, float]:
    spec = state.spec
    networks = state.networks
    warmup_steps = round(spec.optim.warmup_epochs * state.steps_per_epoch)
    momentum_at = _MOMENTUM_SCHEDULES[spec.method.momentum_schedule]
    autocast_dtype = _AUTOCAST_DTYPES[spec.optim.precision]
    # Sums stay on the training device so that no step waits for a copy to the host.
    sums = torch.zeros(len(_STEP_KEYS), device=state.augment.mean.device)
    wait = 0.0
    state.model.train()
    networks.teacher.train()
    started = time.perf_counter()
    ready = started
    lr = momentum = alpha = 0.0

    for view_a, view_b, labels in batches:
        wait += time.perf_counter() - ready

        # Schedules are functions of the global step, applied before the update.
        lr = warmup_cosine_lr(state.step, state.total_steps, warmup_steps, spec.optim.scaled_lr)
        momentum = momentum_at(state.step, state.total_steps, spec.method.momentum_base)
        alpha = alpha_at(
            state.step, state.total_steps, state.steps_per_epoch, spec.rm.alpha,
            spec.rm.alpha_schedule, spec.rm.alpha_warmup_epochs,
        )  # fmt: skip
        for group in state.optimizer.param_groups:
            group["lr"] = lr

        # Student update on the SSL loss + alpha * RM.
        with torch.autocast(
            view_a.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            out = forward_step(
                state.model, networks.teacher, networks.queue, view_a, view_b, spec, alpha
            )
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(out.loss).backward()
        if spec.optim.grad_clip is not None:
            state.scaler.unscale_(state.optimizer)
            nn.utils.clip_grad_norm_(networks.student.parameters(), spec.optim.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()

        # Teacher follows the student right after the optimizer step; the
        # queue takes this batch's keys only after they served as positives.
        ema_update(networks.teacher, networks.student.encoder, momentum)
        if networks.queue is not None:
            networks.queue.push(out.teacher_keys.flatten(0, 1))
        online_accuracy = _online_probe_step(state, out.student_features, labels)
        state.step += 1

        values = (
            out.loss.detach(), out.ssl_loss, out.rm_loss, out.intra_cos,
            out.inter_cos, out.intra_cos_backbone, out.embedding_std, online_accuracy,
        )  # fmt: skip
        sums += torch.stack(values).float()
        ready = time.perf_counter()

    elapsed = time.perf_counter() - started
    means = dist_utils.all_reduce_mean(sums / state.steps_per_epoch).cpu()
    if not torch.isfinite(means).all():
        # Raised before this epoch's checkpoint, so the last one on disk
        # contains weights from before the divergence.
        bad = [key for key, value in zip(_STEP_KEYS, means.tolist(), strict=True)
               if not math.isfinite(value)]  # fmt: skip
        raise DivergenceError(
            f"training diverged in epoch {state.epoch + 1} (step {state.step}): "
            f"{', '.join(bad)} not finite; the last checkpoint is from before it. "
            "Lower optim.lr or set optim.grad_clip"
        )
    metrics = dict(zip(_STEP_KEYS, means.tolist(), strict=True))
    slowest = dist_utils.all_reduce_max(torch.tensor([elapsed])).item()
    wait_frac = dist_utils.all_reduce_mean(torch.tensor([wait / elapsed])).item()
    metrics.update(
        {
            "sched/lr": lr,
            "sched/momentum": momentum,
            "sched/alpha": alpha,
            "perf/img_per_s": state.steps_per_epoch * spec.optim.batch_size / slowest,
            "perf/data_wait_frac": wait_frac,
        }
    )
    return metrics


def _online_probe_step(state: _State, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Train the online linear head one step on detached student features; return its accuracy.

    The head trains on both views, which are the inputs the SSL loss shapes.
    Gradients are averaged over ranks by hand because the head sits outside DDP.
    """
    inputs = features.flatten(0, 1).float()  # (V*B, F)
    targets = labels.long().repeat(features.shape[0])  # (V*B,), view-major like `inputs`
    # Unlabeled images (label -1) count in neither loss nor accuracy. Every rank
    # still steps, so that all ranks run the same gradient all-reduces.
    # NOTE: a batch without labels scores 0, which lowers the epoch mean when
    # training reads unlabeled images. A mean weighted by label count would fix it.
    labeled = (targets >= 0).float()
    count = labeled.sum().clamp(min=1)
    logits = state.online_head(inputs)
    losses = nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    loss = (losses * labeled).sum() / count
    state.online_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for parameter in state.online_head.parameters():
        parameter.grad = dist_utils.all_reduce_mean(parameter.grad)
    state.online_optimizer.step()
    correct = (logits.argmax(1) == targets).float()
    return ((correct * labeled).sum() / count).detach()


# SimSiam (arXiv 2011.10566, section 4.1) reads collapse off the per-dimension
# std of L2-normalized outputs: about 1/sqrt(D) when spread out, 0 when collapsed.
# Warn when it falls below this fraction of 1/sqrt(D).
# NOTE: the fraction is a guess, not calibrated on collapsed runs. BYOL's
# predictions on digits sat at 4% of 1/sqrt(D) while kNN accuracy was 79%, so
# the warning only fires close to 0; a sweep over collapsed and healthy runs
# would set it properly.
_COLLAPSE_FRACTION = 0.001


def _warn_on_collapse(metrics: dict[str, float], epoch: int, dim: int) -> None:
    std = metrics["collapse/embedding_std"]
    healthy = 1 / math.sqrt(dim)
    if std < _COLLAPSE_FRACTION * healthy:
        log.warning(
            "possible collapse in epoch %d: collapse/embedding_std %.4g is below %.1f%% of "
            "1/sqrt(%d) = %.4g, the value of embeddings spread over all dimensions",
            epoch, std, 100 * _COLLAPSE_FRACTION, dim, healthy,
        )  # fmt: skip


def _knn_metrics(state: _State, bank_loader, query_loader, info: DatasetInfo) -> dict[str, float]:
    probe = state.spec.probe
    backbones = {
        "student": state.networks.student.encoder.backbone,
        "teacher": state.networks.teacher.backbone,
    }
    accuracy = {}
    for name, backbone in backbones.items():
        bank, bank_labels = extract_features(backbone, bank_loader, info)
        queries, query_labels = extract_features(backbone, query_loader, info)
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


def _checkpoint_payload(state: _State) -> dict:
    """Everything needed to continue exactly: weights, optimizer, queue, counters, RNG states."""
    augment_states = [state.augment.generator.get_state()]
    if dist_utils.is_distributed():
        # Each rank draws its own augmentations, so every rank's state is kept.
        augment_states = [None] * dist_utils.world_size()
        dist.all_gather_object(augment_states, state.augment.generator.get_state())
    networks = state.networks
    return {
        "spec": json.dumps(state.spec.model_dump(mode="json")),
        "epoch": state.epoch,
        "step": state.step,
        "student": networks.student.state_dict(),
        "teacher": networks.teacher.state_dict(),
        "queue": networks.queue.state_dict() if networks.queue is not None else {},
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "online_head": state.online_head.state_dict(),
        "online_optimizer": state.online_optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "augment_rng": augment_states,
    }


def _restore(state: _State, payload: dict, rank: int) -> None:
    networks = state.networks
    networks.student.load_state_dict(payload["student"])
    networks.teacher.load_state_dict(payload["teacher"])
    if networks.queue is not None:
        networks.queue.load_state_dict(payload["queue"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scaler.load_state_dict(payload["scaler"])
    state.online_head.load_state_dict(payload["online_head"])
    state.online_optimizer.load_state_dict(payload["online_optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    augment_states = payload["augment_rng"]
    if len(augment_states) != dist_utils.world_size():
        raise ValueError(
            f"checkpoint was written by {len(augment_states)} ranks but {dist_utils.world_size()} "
            "are running; resume with the same run.workers"
        )
    state.augment.generator.set_state(augment_states[rank])
    state.epoch = payload["epoch"]
    state.step = payload["step"]


def fit(
    spec: JobSpec,
    train_path: Path,
    test_path: Path,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Train `spec` on this process's share of the data; return the last epoch's metrics.

    Under an initialized process group the student is wrapped in DDP and
    each rank reads its own shard; otherwise this is plain single-process
    training. `on_epoch(epoch, metrics, checkpoint)` runs on every rank with
    the same reduced metrics.

    Args:
        checkpoint_dir: where rank 0 writes `last.pt` every
            `run.checkpoint_every` epochs and after the last; None: no checkpoints.
        resume: continue from `checkpoint_dir/last.pt` (its spec must match).
    """
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if world != spec.run.workers:
        log.warning("spec asks for %d workers but %d are running", spec.run.workers, world)
    options = spec_options(spec.data)
    manifest = check_beton(train_path, options)
    info = dataset_info(spec.data.dataset, len(manifest["class_names"]))
    batch_per_rank = spec.optim.batch_size // world

    torch.manual_seed(spec.seed)
    networks = build(spec)
    networks.student.to(device)
    networks.teacher.to(device)
    if networks.queue is not None:
        networks.queue.to(device)
    if dist_utils.is_distributed() and device.type == "cuda" and spec.run.sync_bn:
        # BatchNorm statistics over the global batch, as BYOL and MoCo v3 use;
        # the teacher's too, so both normalize the same way.
        networks.student = nn.SyncBatchNorm.convert_sync_batchnorm(networks.student)
        networks.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(networks.teacher)
    model: nn.Module = networks.student
    if dist_utils.is_distributed():
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(networks.student, device_ids=device_ids)
    optimizer = build_optimizer(networks.student, spec.optim)

    threads = spec.data.loader_threads
    resolution = spec.data.resolution
    loader = train_loader(
        train_path, batch_per_rank, spec.seed, world > 1, threads, device,
        resolution=resolution, split=spec.data.train_split, expected=options,
    )  # fmt: skip
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
    eval_options = {
        "resolution": resolution,
        "crop_fraction": info.eval_crop_fraction,
        "expected": options,
    }
    bank_loader = eval_loader(train_path, _EVAL_BATCH, rank, world, threads, device, **eval_options)
    query_loader = eval_loader(test_path, _EVAL_BATCH, rank, world, threads, device, **eval_options)
    # One intra-op thread per CPU that Ray gives this worker. It is set after
    # the loaders, because FFCV's Loader sets torch to its own thread count,
    # and `keep_torch_threads` keeps it across epochs.
    torch.set_num_threads(max(1, int(spec.run.cpus_per_worker)))

    scaler = torch.amp.GradScaler(device.type, enabled=spec.optim.precision == "fp16")
    feature_dim = networks.student.encoder.backbone.feature_dim
    # A BatchNorm without parameters first puts the raw features on a common
    # scale, so that the head learns within a few dozen SGD steps.
    online_head = nn.Sequential(
        nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, info.num_classes)
    ).to(device)
    online_optimizer = torch.optim.SGD(
        online_head.parameters(), lr=spec.probe.online_lr, momentum=0.9
    )
    state = _State(
        spec, networks, model, optimizer, augment, scaler, online_head, online_optimizer,
        steps_per_epoch=len(loader),
    )  # fmt: skip
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint directory")
        _restore(state, checkpoint.load(checkpoint_dir / checkpoint.CHECKPOINT_NAME, spec), rank)
        # FFCV derives each epoch's order from the seed and its epoch counter.
        loader.next_epoch = state.epoch
        log.info("resumed from epoch %d (step %d)", state.epoch, state.step)

    metrics: dict[str, float] = {}
    while state.epoch < spec.optim.epochs:
        metrics = _train_epoch(state, batches)
        state.epoch += 1
        if rank == 0:
            _warn_on_collapse(metrics, state.epoch, spec.method.projection_dim)
        metrics.update(_knn_metrics(state, bank_loader, query_loader, info))
        written = None
        is_last = state.epoch == spec.optim.epochs
        if checkpoint_dir is not None and (state.epoch % spec.run.checkpoint_every == 0 or is_last):
            payload = _checkpoint_payload(state)  # a collective: every rank takes part
            if rank == 0:
                written = checkpoint_dir / checkpoint.CHECKPOINT_NAME
                checkpoint.save(written, payload)
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f (ssl %.4f, rm %.4f)  intra gap %.4f  "
                "kNN student %.3f teacher %.3f  %.0f img/s",
                state.epoch, spec.optim.epochs, metrics["loss/total"], metrics["loss/ssl"],
                metrics["loss/rm"], metrics["gap/intra_cos"], metrics["probe/knn_top1_student"],
                metrics["probe/knn_top1_teacher"], metrics["perf/img_per_s"],
            )  # fmt: skip
        if on_epoch is not None:
            on_epoch(state.epoch, metrics, written)
    return metrics
