"""`rmctl probe`: linear probes of a run's frozen encoders, logged to its MLflow run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from resmom import tracking
from resmom.data.beton import check_beton, prepare, spec_options
from resmom.data.loaders import eval_loader
from resmom.data.registry import dataset_info
from resmom.probe.features import extract_features
from resmom.probe.linear import fit_linear_probe, top1
from resmom.specs import validate_job
from resmom.ssl.step import build
from resmom.train import checkpoint

log = logging.getLogger(__name__)
_BATCH = 256


def run_linear_probe(run_id: str, data_dir: Path, checkpoint_path: Path) -> dict[str, float]:
    """Fit a linear probe on frozen student and teacher backbone features; log and return top-1.

    Raises:
        FileNotFoundError: the run has no checkpoint.
        ValueError: the checkpoint is unreadable or contains objects other than
            tensors and plain values.
        RuntimeError: a backbone changed during probing (it must stay frozen).
    """
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"run {run_id} has no checkpoint at {checkpoint_path}")
    payload = checkpoint.read(checkpoint_path)
    spec = validate_job(json.loads(payload["spec"]), source=str(checkpoint_path))
    networks = build(spec)
    networks.student.load_state_dict(payload["student"])
    networks.teacher.load_state_dict(payload["teacher"])

    options = spec_options(spec.data)
    paths = prepare(spec.data.dataset, data_dir, options=options)
    info = dataset_info(spec.data.dataset, len(check_beton(paths["train"])["class_names"]))
    cpu = torch.device("cpu")
    eval_options = {
        "resolution": spec.data.resolution,
        "crop_fraction": info.eval_crop_fraction,
        "expected": options,
    }
    threads = spec.data.loader_threads
    train = eval_loader(paths["train"], _BATCH, 0, 1, threads, cpu, **eval_options)
    test = eval_loader(paths["test"], _BATCH, 0, 1, threads, cpu, **eval_options)

    metrics = {}
    backbones = {"student": networks.student.encoder.backbone, "teacher": networks.teacher.backbone}
    for name, backbone in backbones.items():
        backbone.requires_grad_(False)
        frozen = {key: value.clone() for key, value in backbone.state_dict().items()}
        train_features, train_labels = extract_features(backbone, train, info)
        test_features, test_labels = extract_features(backbone, test, info)
        head = fit_linear_probe(train_features, train_labels, info.num_classes)
        metrics[f"probe/linear_top1_{name}"] = top1(head, test_features, test_labels)
        # A probe that moved the backbone would measure a different network.
        for key, value in backbone.state_dict().items():
            if not torch.equal(value, frozen[key]):
                raise RuntimeError(f"{name} backbone changed during linear probing: {key}")
        log.info("%s: linear top-1 %.4f", name, metrics[f"probe/linear_top1_{name}"])

    # The run's own spec names its tracking server, so the metrics land in the same run.
    tracking_uri = tracking.resolve_tracking_uri(spec.run.tracking_uri, data_dir)
    logger = tracking.MetricsLogger(tracking_uri, run_id)
    logger.log(metrics, step=int(payload["epoch"]))
    logger.close(spec.run.tracking_flush_timeout)
    return metrics
